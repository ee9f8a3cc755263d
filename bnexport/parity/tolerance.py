"""Tolerances as data: the noise-relative rule (default) and fixed rtol/atol (`--tolerance fixed`).

**Noise-relative rule** (the default): :class:`bnexport.noise.NoiseTolerance`, documented there.

**Fixed rule** (:class:`Tolerance`): an element passes when ``|a − r| <= atol + rtol·|r|`` with
``atol = atol_scale · max(1, max|ref|)`` (``max|ref|`` per sample), against the fp32 reference.

Defaults per runner kind (``DEFAULT_TOLERANCES``, fixed mode only):

====================  ======  ==========  ===============================================
kind                  rtol    atol_scale  why
====================  ======  ==========  ===============================================
``cpu``               1e-4    1e-5        onnxruntime CPU, fp32: summation order only
``torch``             1e-4    1e-5        PyTorch folded fp32 / float64 vs the fp32 reference
``cuda``              1e-3    1e-4        onnxruntime CUDA with ``use_tf32=0`` (cuDNN algorithms)
``cuda-tf32``         1e-2    1e-2        CUDA with TF32 (10-bit mantissa); reported, not gating
====================  ======  ==========  ===============================================

Fixed tolerances sit below the fp32 noise floor of deep networks (docs/parity.md); they stay for
users who need a contractual bound.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from bnexport.errors import ParityInputError
from bnexport.noise import sample_scale

TOLERANCE_KINDS: tuple[str, ...] = ("cpu", "torch", "cuda", "cuda-tf32")


@dataclass(frozen=True)
class Tolerance:
    """``|a − r| <= atol + rtol·|r|``, ``atol = atol_scale · max(1, max|ref|)`` (per sample)."""

    rtol: float
    atol_scale: float

    def __post_init__(self) -> None:
        for name in ("rtol", "atol_scale"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value >= 0):
                raise ParityInputError(f"tolerance {name}={value!r} must be finite and >= 0")

    def atol(self, ref_max_abs: float | np.ndarray) -> float | np.ndarray:
        """The absolute tolerance for an output whose largest magnitude is ``ref_max_abs``."""
        return self.atol_scale * np.maximum(1.0, ref_max_abs)

    def allowed(self, reference: np.ndarray) -> np.ndarray:
        """Per-element allowed error ``atol_i + rtol·|r|`` (float64, shape of ``reference``)."""
        ref = np.asarray(reference, dtype=np.float64)
        return self.atol(sample_scale(ref)) + self.rtol * np.abs(ref)

    def passes(self, candidate: np.ndarray, reference: np.ndarray) -> np.ndarray:
        """Element-wise pass mask (non-finite values pass only where both agree exactly)."""
        cand = np.asarray(candidate, dtype=np.float64)
        ref = np.asarray(reference, dtype=np.float64)
        with np.errstate(invalid="ignore"):
            ok = np.abs(cand - ref) <= self.allowed(ref)
        same_nonfinite = (np.isnan(cand) & np.isnan(ref)) | (np.isinf(cand) & (cand == ref))
        return ok | same_nonfinite

    def __str__(self) -> str:
        return f"rtol={self.rtol:g}, atol={self.atol_scale:g}·max(1,|ref|)"

    def short(self) -> str:
        """``rtol / atol_scale``, for table cells."""
        return f"{self.rtol:g} / {self.atol_scale:g}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "cpu": Tolerance(rtol=1e-4, atol_scale=1e-5),
    "torch": Tolerance(rtol=1e-4, atol_scale=1e-5),
    "cuda": Tolerance(rtol=1e-3, atol_scale=1e-4),
    "cuda-tf32": Tolerance(rtol=1e-2, atol_scale=1e-2),
}


def resolve_tolerances(
    overrides: Mapping[str, Tolerance] | None = None,
) -> dict[str, Tolerance]:
    """The defaults with ``overrides`` (by kind) applied."""
    merged = dict(DEFAULT_TOLERANCES)
    for kind, tol in (overrides or {}).items():
        if kind not in TOLERANCE_KINDS:
            raise ParityInputError(
                f"unknown tolerance kind {kind!r}; choose from {', '.join(TOLERANCE_KINDS)}"
            )
        merged[kind] = tol
    return merged


def parse_tolerance_overrides(
    rtol: Iterable[str] = (), atol: Iterable[str] = ()
) -> dict[str, Tolerance]:
    """Turn ``--rtol``/``--atol`` values into per-kind overrides.

    Each value is ``NUMBER`` (every kind) or ``KIND=NUMBER`` (one kind), e.g. ``--rtol 1e-3``,
    ``--atol cuda=5e-4``. ``--atol`` is the scale: ``atol = NUMBER · max(1, max|ref|)``.
    """
    rtols: dict[str, float] = {}
    atols: dict[str, float] = {}
    for flag, values, into in (("--rtol", rtol, rtols), ("--atol", atol, atols)):
        for raw in values:
            kinds: Iterable[str] = TOLERANCE_KINDS
            text = raw.strip()
            if "=" in text:
                kind, text = (part.strip() for part in text.split("=", 1))
                if kind not in TOLERANCE_KINDS:
                    raise ParityInputError(
                        f"{flag} {raw!r}: unknown runner kind {kind!r}; "
                        f"use one of {', '.join(TOLERANCE_KINDS)} (or a bare number for all)"
                    )
                kinds = (kind,)
            try:
                value = float(text)
            except ValueError:
                raise ParityInputError(
                    f"{flag} {raw!r} is not a number; use e.g. {flag} 1e-4 or {flag} cuda=1e-3"
                ) from None
            if not (np.isfinite(value) and value >= 0):
                raise ParityInputError(f"{flag} {raw!r} must be a finite number >= 0")
            for kind in kinds:
                into[kind] = value
    out: dict[str, Tolerance] = {}
    for kind in TOLERANCE_KINDS:
        if kind in rtols or kind in atols:
            base = DEFAULT_TOLERANCES[kind]
            out[kind] = Tolerance(
                rtol=rtols.get(kind, base.rtol), atol_scale=atols.get(kind, base.atol_scale)
            )
    return out
