"""The noise rule: a candidate passes when its error against the float64 truth is within a multiple
of fp32's own error on the same model and inputs (docs/parity.md).

A leaf (numpy and `bnexport.errors` only): parity decides with it, the fold's float64 self-check
and tune's output check too.

Per output, with ``t`` the float64 forward of the unfolded model (the truth), ``r`` PyTorch fp32's
output (the reference) and ``c`` a candidate, each sample ``i`` (first axis) is measured relative
to its own scale ``sᵢ = max|tᵢ|``::

    E = maxᵢ max|cᵢ − tᵢ| / sᵢ        the candidate's error
    N = maxᵢ max|rᵢ − tᵢ| / sᵢ        the noise floor: fp32's own error on this model and input
    F = max(N, floor_ulps · eps)      never below a few ulps (fp32 can be exact on some inputs)
    pass  ⇔  E ≤ factor · ρ · F

``ρ = eps_candidate / eps_reference`` rescales the fp32-measured floor to a candidate computing at
another precision (1 for fp32; 2¹³ for TF32; 2⁻²⁹ for the float64 fold self-check).
Both maxima take the worst sample, so one input does not set the scale for the others, and the
floor is measured exactly as the error is. A NaN/Inf where the truth is finite is an infinite
error. Measured separation (correct exports vs injected faults): docs/parity.md.

**Ill-conditioned edge cases** (:func:`noise_floor`). An edge-case sample (constant or ±huge
input) on which fp32's own error is over ``ILL_CONDITIONED_RATIO`` times its error on the
data-like samples (random, images) is one float32 cannot resolve: two correct fp32
implementations may land far apart on it (timm mixnet_s on all −1e4: PyTorch 1.7e-4, onnxruntime
without fusions 0.39 of the scale; PyTorch itself 0.39 after a 1-ulp change of the input). Such
samples are left out of ``E`` and ``N`` and checked for NaN/Inf only.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from bnexport.errors import ParityInputError

#: The default ``factor`` of the noise-relative rule: a candidate may err this many times fp32's
#: own error. Measured (docs/parity.md, scripts/parity_separation.py, 15 models): correct exports
#: reach at most 2.77× (mobilenet_v2, onnxruntime at batch 1), the mildest injected fault 7.77×
#: (a channel scaled to ~8× the floor); 4 sits between, 1.4× and 1.9× from each.
DEFAULT_NOISE_FACTOR = 4.0
#: The noise floor is never taken below this many ulps (``eps``) of a sample's scale.
NOISE_FLOOR_ULPS = 4.0
#: An edge-case sample whose fp32 error exceeds this many times the data-like samples' worst is
#: too ill-conditioned for a float32 precision verdict (module docstring). Measured: data-like
#: samples' fp32 errors differ by < 3× across samples and paths; the constant ±1e4 inputs of
#: gated networks (SE/SiLU: mobilenet_v2, mixnet_s) err 17–60× their random samples.
ILL_CONDITIONED_RATIO = 10.0
#: ``eps`` the arithmetic of each runner kind rounds to, relative to fp32 (``ρ`` above).
KIND_PRECISION: dict[str, float] = {
    "cpu": 1.0,
    "torch": 1.0,
    "cuda": 1.0,
    "cuda-tf32": 2.0**-10 / 2.0**-23,  # TF32 keeps 10 mantissa bits
}


@dataclass(frozen=True)
class NoiseTolerance:
    """Pass when ``E ≤ factor · ρ · max(N, floor_ulps · eps)`` (module docstring).

    The one pass/fail rule of the noise-relative mode: `bnexport check`, `bnexport onnx`'s parity
    step and the fold's float64 self-check all decide with :meth:`passes`.
    """

    factor: float = DEFAULT_NOISE_FACTOR
    floor_ulps: float = NOISE_FLOOR_ULPS

    def __post_init__(self) -> None:
        for name in ("factor", "floor_ulps"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value > 0):
                raise ParityInputError(f"noise tolerance {name}={value!r} must be finite and > 0")

    def floor(self, noise: float, eps: float) -> float:
        """The noise floor ``F = max(N, floor_ulps · eps)`` (relative to the sample's scale)."""
        return max(float(noise), self.floor_ulps * float(eps))

    def limit(self, noise: float, eps: float, precision: float = 1.0) -> float:
        """The largest error that passes: ``factor · ρ · F``."""
        return self.factor * float(precision) * self.floor(noise, eps)

    def passes(self, error: float, noise: float, eps: float, precision: float = 1.0) -> bool:
        """``error <= limit`` (a NaN error fails)."""
        return bool(float(error) <= self.limit(noise, eps, precision))

    def __str__(self) -> str:
        return f"error <= {self.factor:g} × noise floor (floor >= {self.floor_ulps:g} ulp)"

    def short(self) -> str:
        return f"{self.factor:g}×"

    def to_dict(self) -> dict[str, Any]:
        return {"rule": "noise", **asdict(self)}


@dataclass(frozen=True)
class SampleError:
    """``E = maxᵢ max|cᵢ − tᵢ| / sᵢ``, where it is reached (sample, element index) and ``sᵢ``."""

    value: float
    sample: int
    index: tuple[int, ...]
    scale: float = 1.0


def relative_error(candidate: np.ndarray, truth: np.ndarray) -> SampleError:
    """The worst sample's max-abs error relative to that sample's ``max|truth|`` (float64).

    ``sᵢ = max|tᵢ|`` over the finite values of sample ``i``; a sample whose truth is all zeros is
    scaled by the output's largest magnitude (1 when that is 0 too). Non-finite values agree only
    where both are NaN or the same infinity; otherwise the error is infinite.
    """
    tru = np.asarray(truth, dtype=np.float64)
    if np.shape(candidate) != tru.shape:
        raise ValueError(f"shape {np.shape(candidate)} vs truth {tru.shape}")
    if not tru.size:
        return SampleError(0.0, 0, (), 1.0)
    rel, full = _relative(candidate, tru)
    pos = np.unravel_index(int(np.argmax(rel)), tru.shape)
    return SampleError(
        float(rel[pos]),
        int(pos[0]) if tru.ndim >= 1 else 0,
        tuple(int(i) for i in pos[1:]),
        float(full[pos]),
    )


def _relative(candidate: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Element-wise ``|c − t| / sᵢ`` and the scales ``sᵢ`` (broadcast), as `relative_error`
    defines them."""
    cand = np.asarray(candidate, dtype=np.float64)
    tru = np.asarray(truth, dtype=np.float64)
    if cand.shape != tru.shape:
        raise ValueError(f"shape {cand.shape} vs truth {tru.shape}")
    agree = (np.isnan(cand) & np.isnan(tru)) | (np.isinf(cand) & (cand == tru))
    with np.errstate(invalid="ignore"):
        err = np.abs(cand - tru)
    err = np.where(agree, 0.0, err)
    err = np.where(np.isnan(err), np.inf, err)
    scale = sample_scale(tru)
    overall = float(scale.max()) if scale.size else 0.0
    scale = np.where(scale > 0, scale, overall if overall > 0 else 1.0)
    full = np.broadcast_to(scale, tru.shape)
    return err / full, full


def sample_errors(candidate: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Each sample's ``max|cᵢ − tᵢ| / sᵢ`` (as in `relative_error`; one value for a 0-d/1-d
    output, which is one sample)."""
    tru = np.asarray(truth, dtype=np.float64)
    if tru.ndim <= 1 or not tru.size:
        return np.array([relative_error(candidate, tru).value])
    rel, _ = _relative(candidate, tru)
    return rel.reshape(tru.shape[0], -1).max(axis=1)


def noise_floor(
    draws: Iterable[np.ndarray], truth: np.ndarray, edge: np.ndarray | None
) -> tuple[float, np.ndarray]:
    """``(N, ungated)`` for one output: the worst fp32 error over the reference's ``draws`` and the
    gated samples, and which samples are left out as ill-conditioned edge cases (module
    docstring). ``edge`` marks the edge-case samples (None: no sample is left out)."""
    per = np.max([sample_errors(d, truth) for d in draws], axis=0)
    ungated = np.zeros(per.shape, dtype=bool)
    if edge is not None and edge.shape == per.shape and (~edge).any():
        eps = float(np.finfo(np.float32).eps)
        data = max(float(per[~edge].max()), NOISE_FLOOR_ULPS * eps)
        ungated = edge & (per > ILL_CONDITIONED_RATIO * data)
    gated = per[~ungated]
    return (float(gated.max()) if gated.size else float(per.max())), ungated


def order_floors(
    reordered: Iterable[np.ndarray], truth: np.ndarray, noise: float
) -> np.ndarray | None:
    """Each sample's noise floor ``Nᵢ = max(N, Rᵢ)``: PyTorch's own ``N`` (`noise_floor`), raised
    on the samples where the ``reordered`` draws (the reference with its long sums added in
    another order, `bnexport.parity.orders`) err more, ``Rᵢ`` their worst error on sample ``i``.

    Order raises the floor only where it changes the result: on conv → global pool 64×64 the
    constant images' long same-signed sums err 12× PyTorch's own in 8-lane order, the random
    samples' do not, so a fault still has to hide under PyTorch's own floor there. None when
    there is no reordered draw."""
    draws = [sample_errors(d, truth) for d in reordered]
    if not draws:
        return None
    return np.maximum(np.max(draws, axis=0), noise)


def draw_floors(
    draws: Iterable[np.ndarray], truth: np.ndarray, ungated: np.ndarray | None
) -> list[float]:
    """Each draw's own worst error over the gated samples (which draw sets a floor, for a
    report)."""
    floors = []
    for draw in draws:
        per = sample_errors(draw, truth)
        keep = per if ungated is None or ungated.shape != per.shape else per[~ungated]
        floors.append(float(keep.max()) if keep.size else float(per.max()))
    return floors


def worst_sample(
    candidate: np.ndarray, truth: np.ndarray, floors: np.ndarray, eps: float
) -> tuple[SampleError, float]:
    """``(E at the worst sample, that sample's floor Nᵢ)``, the worst sample being the one with
    the largest ``Eᵢ / max(Nᵢ, NOISE_FLOOR_ULPS · eps)`` (`order_floors`)."""
    tru = np.asarray(truth, dtype=np.float64)
    per = sample_errors(candidate, tru)
    floor = np.maximum(np.broadcast_to(floors, per.shape), NOISE_FLOOR_ULPS * eps)
    with np.errstate(invalid="ignore"):
        ratio = np.where(np.isnan(per), np.inf, per / floor)
    i = int(np.argmax(ratio))
    at_floor = float(np.broadcast_to(floors, per.shape)[i])
    if tru.ndim <= 1 or not tru.size:
        return relative_error(candidate, tru), at_floor
    rel, full = _relative(candidate, tru)
    pos = np.unravel_index(int(np.argmax(rel[i])), tru.shape[1:])
    index = tuple(int(k) for k in pos)
    return SampleError(float(rel[i][index]), i, index, float(full[i][index])), at_floor


def gated_candidate(
    candidate: np.ndarray, truth: np.ndarray, ungated: np.ndarray | None
) -> np.ndarray:
    """``candidate`` with its finite values on the ``ungated`` samples replaced by the truth: they
    count for nothing in ``E``, while a NaN/Inf there still fails."""
    cand = np.asarray(candidate, dtype=np.float64)
    tru = np.asarray(truth, dtype=np.float64)
    if ungated is None or not ungated.any() or tru.ndim < 1 or ungated.shape[0] != tru.shape[0]:
        return cand
    mask = ungated.reshape((-1,) + (1,) * (tru.ndim - 1))
    return np.where(mask & np.isfinite(cand), tru, cand)


def sample_scale(reference: np.ndarray) -> np.ndarray:
    """``max|ref|`` per sample, broadcastable against ``reference`` (finite values only).

    The first axis is the batch; a 0-d or 1-d output is one sample.
    """
    ref = np.abs(np.asarray(reference, dtype=np.float64))
    ref = np.where(np.isfinite(ref), ref, 0.0)
    if ref.ndim <= 1:
        return np.full(ref.shape, ref.max() if ref.size else 0.0)
    per_sample = ref.reshape(ref.shape[0], -1).max(axis=1) if ref.size else np.zeros(ref.shape[0])
    return per_sample.reshape((ref.shape[0],) + (1,) * (ref.ndim - 1))
