"""Model shape, training hyper-parameters and the flat parameter layout.

All weights of one model live in one flat vector so that Adam, gradient clipping and
checkpoints are a single loop / array. Per layer the layout is

    Wx[in_l, 4H] | Wh[H, 4H] | b[4H]

(gate order i, f, g, o as in PyTorch), then the head Wy[H, O] | by[O]. Rows are the
*input* index, so a gate pre-activation is a sum of contiguous axpys over the 4H gates:
the layout the kernels vectorise well.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .config import ModelConfig

# Codes passed to the kernels (they take scalars, not strings).
OPT_ADAM, OPT_SGD = 0, 1
LOSS_MSE, LOSS_HUBER = 0, 1

# Per-element outcome of a step, as the kernels and the reference return it.
STATUS_OK = 0
STATUS_RESET = 1  # non-finite state or prediction: the sensor's state was reset
STATUS_SKIPPED = 2  # non-finite gradient: the update was skipped


@dataclasses.dataclass(frozen=True)
class ModelSpec(ModelConfig):
    """A group's model as the kernels see it: the `model:` config section (`config.ModelConfig`
    holds the keys, defaults, ranges and documentation; the config validates them) plus what the
    data decides, the input width, and Adam's constants, which are no settings.

    Frozen like the section it extends: one spec serves every sensor of a group.
    """

    input_size: int = 1
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    @classmethod
    def from_config(cls, model: ModelConfig, input_size: int) -> "ModelSpec":
        """The spec of a group whose readings carry `input_size` values; ValueError when the
        configured target_feature is no index of such a reading (the config cannot know)."""
        if model.target_feature is not None and model.target_feature >= input_size:
            raise ValueError(f"target_feature {model.target_feature} is no index of a reading of "
                             f"{input_size} values")
        return cls(input_size=input_size, **{f.name: getattr(model, f.name) for f in dataclasses.fields(ModelConfig)})

    @property
    def np_dtype(self):
        return np.dtype(self.dtype)

    @property
    def output_size(self) -> int:
        return self.input_size if self.target_feature is None else 1

    @property
    def target_index(self) -> int:
        """First input feature the head predicts (the outputs are contiguous features)."""
        return 0 if self.target_feature is None else self.target_feature

    @property
    def gates(self) -> int:
        return 4 * self.hidden_size

    def layer_input_size(self, layer: int) -> int:
        return self.input_size if layer == 0 else self.hidden_size

    @property
    def layout(self) -> "ParamLayout":
        return ParamLayout.of(self)

    @property
    def num_params(self) -> int:
        return self.layout.size

    @property
    def optimizer_code(self) -> int:
        return OPT_ADAM if self.optimizer == "adam" else OPT_SGD

    @property
    def loss_code(self) -> int:
        return LOSS_MSE if self.loss == "mse" else LOSS_HUBER

    def shape_key(self) -> tuple:
        """What must match for weights to be reusable (checkpoints, reloads)."""
        return (self.input_size, self.hidden_size, self.num_layers, self.output_size, self.dtype)


@dataclasses.dataclass(frozen=True)
class ParamLayout:
    """Offsets into the flat parameter vector.

    `layers[l] = (wx, wh, b)` offsets; `head = (wy, by)`; `size` the total length.
    """

    layers: tuple
    head: tuple
    size: int

    @staticmethod
    def of(spec: ModelSpec) -> "ParamLayout":
        G, H = spec.gates, spec.hidden_size
        offset = 0
        layers = []
        for layer in range(spec.num_layers):
            wx = offset
            offset += spec.layer_input_size(layer) * G
            wh = offset
            offset += H * G
            b = offset
            offset += G
            layers.append((wx, wh, b))
        wy = offset
        offset += H * spec.output_size
        by = offset
        offset += spec.output_size
        return ParamLayout(tuple(layers), (wy, by), offset)

    def offsets_array(self) -> np.ndarray:
        """(L + 1, 3) int64: per layer (wx, wh, b), last row (wy, by, size); kernels take this."""
        rows = [list(r) for r in self.layers] + [[self.head[0], self.head[1], self.size]]
        return np.asarray(rows, dtype=np.int64)


def init_params(spec: ModelSpec, seed: int | None = None) -> np.ndarray:
    """PyTorch-style uniform(-1/sqrt(H), 1/sqrt(H)) init, forget-gate bias 1.0, zero head bias."""
    rng = np.random.default_rng(spec.seed if seed is None else seed)
    H = spec.hidden_size
    bound = 1.0 / np.sqrt(H)
    theta = rng.uniform(-bound, bound, size=spec.num_params)
    layout = spec.layout
    for _, _, b in layout.layers:
        theta[b : b + spec.gates] = 0.0
        theta[b + H : b + 2 * H] = 1.0  # forget gate: remember by default
    wy, by = layout.head
    theta[by : by + spec.output_size] = 0.0
    return theta.astype(spec.np_dtype)


def unpack(spec: ModelSpec, theta: np.ndarray) -> dict:
    """Named views into a flat parameter vector (for the reference and for tests)."""
    layout = spec.layout
    G, H, O = spec.gates, spec.hidden_size, spec.output_size
    out = {"Wx": [], "Wh": [], "b": []}
    for layer, (wx, wh, b) in enumerate(layout.layers):
        n_in = spec.layer_input_size(layer)
        out["Wx"].append(theta[wx : wx + n_in * G].reshape(n_in, G))
        out["Wh"].append(theta[wh : wh + H * G].reshape(H, G))
        out["b"].append(theta[b : b + G])
    wy, by = layout.head
    out["Wy"] = theta[wy : wy + H * O].reshape(H, O)
    out["by"] = theta[by : by + O]
    return out
