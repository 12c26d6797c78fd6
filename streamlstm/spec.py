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

OPTIMIZERS = ("adam", "sgd")
LOSSES = ("mse", "huber")
DTYPES = ("float32", "float64")

# Codes passed to the kernels (they take scalars, not strings).
OPT_ADAM, OPT_SGD = 0, 1
LOSS_MSE, LOSS_HUBER = 0, 1


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    input_size: int = 1
    hidden_size: int = 32
    num_layers: int = 1
    target_feature: int | None = None  # None: predict all input features
    window: int = 32
    train_every: int = 1
    optimizer: str = "sgd"  # measured: far steadier than Adam for one-window-per-reading online updates
    learning_rate: float = 0.2
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    loss: str = "huber"
    huber_delta: float = 1.0
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    dropout: float = 0.0
    input_clip: float = 10.0
    seed: int = 0
    dtype: str = "float32"

    def __post_init__(self):
        checks = [
            (self.input_size >= 1, "input_size must be >= 1"),
            (self.hidden_size >= 1, "hidden_size must be >= 1"),
            (self.num_layers >= 1, "num_layers must be >= 1"),
            (self.window >= 1, "window must be >= 1"),
            (self.train_every >= 1, "train_every must be >= 1"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}"),
            (self.loss in LOSSES, f"loss must be one of {LOSSES}"),
            (self.dtype in DTYPES, f"dtype must be one of {DTYPES}"),
            (0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)"),
            (self.learning_rate > 0, "learning_rate must be > 0"),
            (self.grad_clip >= 0, "grad_clip must be >= 0 (0 disables)"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.huber_delta > 0, "huber_delta must be > 0"),
            (self.input_clip > 0, "input_clip must be > 0"),
            (
                self.target_feature is None or 0 <= self.target_feature < self.input_size,
                "target_feature must be None or an input index",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

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
