"""ModelBank: the per-slot state of one model group, stepped in batches by a backend.

Arrays (S = slot capacity, R = weight rows: 1 for shared weights, S for per-sensor):
  theta, m, v (R, P)      weights and Adam moments;  adam_t (R,) optimizer step count
  h, c (S, L, H)          carried LSTM state
  ring_x (S, T, I)        the last T (clipped, scaled) inputs of each slot
  ring_h, ring_c (S, T, L, H)  the state *before* each of those inputs (BPTT window start)
  ring_pos, ring_len (S,) ring write position and fill
  pred (S, O)             the prediction made for each slot's next reading
  since_train (S,)        readings since the slot's last training window
  grad_sum (1, P), grad_count (1,)  shared weights only: the gradients trained since the last
                          update, waiting for it (`apply_shared`)
  phase (1,)              shared weights only: rounds stepped since the last segment ended

Growing the capacity copies the arrays into bigger ones (amortised doubling); the kernels
take arrays as arguments, so nothing recompiles and no state is lost.
"""
from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from .lstm_math import reset_slot
from .spec import ModelSpec, init_params

STATE_ARRAYS = ("h", "c", "ring_x", "ring_h", "ring_c", "ring_pos", "ring_len", "pred", "since_train")
WEIGHT_ARRAYS = ("theta", "m", "v", "adam_t")
PENDING_ARRAYS = ("grad_sum", "grad_count", "phase")  # shared weights: the segment in progress


@dataclasses.dataclass
class StepResult:
    prediction: np.ndarray  # (B, O) made before the reading arrived (scaled units)
    next_prediction: np.ndarray  # (B, O) for the reading after it
    loss: np.ndarray  # (B,) training loss of the window, NaN where no training ran
    status: np.ndarray  # (B,) 0 ok, 1 state reset (non-finite), 2 update skipped


def _row_seed(spec: ModelSpec, row: int) -> int:
    # Distinct, reproducible init per slot for per-sensor weights (callers that name no key).
    return (spec.seed * 1_000_003 + row) % (2**63)


def key_seed(spec: ModelSpec, key: str) -> int:
    """The init seed of a per-sensor weight row keyed by the sensor's id: the same weights
    whichever slot the sensor gets, on whichever worker (a sensor's state after a sequence of
    readings must not depend on which other sensors arrived first; docs/scaling.md)."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return (spec.seed * 1_000_003 + int.from_bytes(digest, "little")) % (2**63)


class ModelBank:
    def __init__(self, spec: ModelSpec, shared: bool, backend, capacity: int = 16):
        self.spec = spec
        self.shared = shared
        self.backend = backend
        self.size = 0  # slots handed out
        self.capacity = 0
        dt = spec.np_dtype
        P = spec.num_params
        self.offs = spec.layout.offsets_array()
        self.theta = np.empty((0, P), dtype=dt)
        if shared:
            self.theta = init_params(spec)[None, :].copy()
            self.m = np.zeros_like(self.theta)
            self.v = np.zeros_like(self.theta)
            self.adam_t = np.zeros(1, dtype=np.int64)
            self.grad_sum = np.zeros_like(self.theta)
            self.grad_count = np.zeros(1, dtype=np.int64)
            self.phase = np.zeros(1, dtype=np.int64)
        self._alloc_state(max(1, capacity))
        backend.attach(self)

    # --- capacity ---------------------------------------------------------------------

    def _blank_state(self, n: int) -> dict:
        s = self.spec
        dt = s.np_dtype
        L, H, T, I, O = s.num_layers, s.hidden_size, s.window, s.input_size, s.output_size
        return {
            "h": np.zeros((n, L, H), dt),
            "c": np.zeros((n, L, H), dt),
            "ring_x": np.zeros((n, T, I), dt),
            "ring_h": np.zeros((n, T, L, H), dt),
            "ring_c": np.zeros((n, T, L, H), dt),
            "ring_pos": np.zeros(n, np.int64),
            "ring_len": np.zeros(n, np.int64),
            "pred": np.zeros((n, O), dt),
            "since_train": np.zeros(n, np.int64),
        }

    def _blank_weights(self, n: int) -> dict:
        # Rows get their init when add_slot hands them out (keyed by the sensor when it has one).
        theta = np.zeros((n, self.spec.num_params), self.spec.np_dtype)
        return {"theta": theta, "m": np.zeros_like(theta), "v": np.zeros_like(theta), "adam_t": np.zeros(n, np.int64)}

    def _alloc_state(self, new_capacity: int):
        old = self.capacity
        blank = self._blank_state(new_capacity - old)
        if not self.shared:
            blank.update(self._blank_weights(new_capacity - old))
        for name, extra in blank.items():
            current = getattr(self, name, None)
            setattr(self, name, extra if current is None or old == 0 else np.concatenate([current, extra]))
        self.capacity = new_capacity

    def ensure_capacity(self, n: int):
        if n <= self.capacity:
            return
        self.backend.sync(self)
        self._alloc_state(max(n, 2 * self.capacity))
        self.backend.attach(self)

    def add_slot(self, key: str | None = None) -> int:
        """A new slot; per-sensor weights start from an init seeded by `key` (the sensor id),
        or by the slot number when no key is given."""
        slot = self.size
        self.ensure_capacity(slot + 1)
        self.size += 1
        if not self.shared:
            seed = _row_seed(self.spec, slot) if key is None else key_seed(self.spec, key)
            self.theta[slot] = init_params(self.spec, seed=seed)
            self.backend.init_weights(self, slot)
        return slot

    def reset_slot(self, s: int):
        """Forget a slot's carried state and history (weights stay)."""
        reset_slot(s, self.h, self.c, self.ring_len, self.ring_pos, self.pred)  # the kernels' own
        self.since_train[s] = 0
        self.backend.reset_slot(self, s)

    # --- stepping ---------------------------------------------------------------------

    def step(self, slots, x, lr_scale=None, learn: bool = True, apply: bool = True) -> StepResult:
        """One reading for each of `slots` (distinct): score-side prediction, train, forward.

        x: (B, I) scaled readings. lr_scale (B,): 0 skips training, 1 full learning rate
        (learning protection passes a smaller factor for suspected anomalies). A slot trains
        every `train_every` of its readings. Shared weights: the step's gradients join the
        pending sum, applied as one update now, or (apply=False) by a later `apply_shared`.
        """
        slots = np.ascontiguousarray(slots, dtype=np.int64)
        x = np.ascontiguousarray(x, dtype=self.spec.np_dtype).reshape(len(slots), self.spec.input_size)
        B = len(slots)
        if B and (slots.min() < 0 or slots.max() >= self.size):
            raise IndexError("slot out of range")
        if len(np.unique(slots)) != B:
            raise ValueError("a slot may appear only once per step")
        self.backend.sync_pred(self)
        before = self.pred[slots].copy()
        scale = np.ones(B) if lr_scale is None else np.asarray(lr_scale, dtype=np.float64)
        self.since_train[slots] += 1
        due = self.since_train[slots] >= self.spec.train_every
        self.since_train[slots[due]] = 0
        scale = np.where(due & learn, scale, 0.0)
        if np.any(scale > 0):
            loss, status = self.backend.train(self, slots, x, scale)
        else:
            loss, status = np.full(B, np.nan), np.zeros(B, np.int64)
        if apply:
            self.apply_shared()
        fstatus = self.backend.forward(self, slots, x)
        self.backend.sync_pred(self)
        status = np.maximum(status, fstatus)
        self.since_train[slots[fstatus == 1]] = 0  # the kernels reset h/c/ring; this is host-side
        return StepResult(before, self.pred[slots].copy(), loss, status)

    def end_round(self):
        """Shared weights: a round was stepped (with apply=False); the segment of train_every
        rounds it completes ends with the update. Segments follow the rounds the group has
        stepped since it began, not batch boundaries, so one sensor's state does not depend
        on how its readings were batched."""
        if not self.shared:
            return
        self.phase[0] += 1
        if self.phase[0] >= self.spec.train_every:
            self.apply_shared()
            self.phase[0] = 0

    def apply_shared(self):
        """Shared weights: one update from the mean of the pending gradients (a no-op for
        per-sensor weights, which update with each window, or when nothing is pending)."""
        if self.shared and self.grad_count[0]:
            self.backend.apply_shared(self)

    def predict(self, slots) -> np.ndarray:
        self.backend.sync_pred(self)
        return self.pred[np.asarray(slots, dtype=np.int64)].copy()

    def weight_rows(self, slots) -> np.ndarray:
        slots = np.asarray(slots, dtype=np.int64)
        return np.zeros_like(slots) if self.shared else slots

    # --- checkpoints ------------------------------------------------------------------

    def state_dict(self, copy: bool = True) -> dict:
        """The state of every slot: copies, or views (`copy=False`: read them before the next
        step; detector/transfer.py picks rows out of them)."""
        self.backend.sync(self)
        arrays = {name: getattr(self, name)[: self.size] for name in STATE_ARRAYS}
        for name in WEIGHT_ARRAYS:
            value = getattr(self, name)
            arrays[name] = value if self.shared else value[: self.size]
        if self.shared:
            arrays.update({name: getattr(self, name) for name in PENDING_ARRAYS})
        return {k: v.copy() for k, v in arrays.items()} if copy else arrays

    def load_state_dict(self, arrays: dict, size: int):
        """Restore from `state_dict` output; shapes must match this bank's spec."""
        self.backend.sync(self)
        self.size = 0
        self.ensure_capacity(max(size, 1))
        for name in STATE_ARRAYS + WEIGHT_ARRAYS:
            src = arrays[name]
            dst = getattr(self, name)
            if self.shared and name in WEIGHT_ARRAYS:
                if src.shape != dst.shape:
                    raise ValueError(f"{name}: shape {src.shape} does not fit {dst.shape}")
                dst[...] = src
            else:
                if src.shape[1:] != dst.shape[1:] or src.shape[0] != size:
                    raise ValueError(f"{name}: shape {src.shape} does not fit {(size,) + dst.shape[1:]}")
                dst[:size] = src
        self.size = size
        if self.shared:
            for name in PENDING_ARRAYS:  # absent in checkpoints of older versions: nothing pending
                dst = getattr(self, name)
                dst[...] = arrays[name] if name in arrays and arrays[name].shape == dst.shape else 0
        self.backend.attach(self)
