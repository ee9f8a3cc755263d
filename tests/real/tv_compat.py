"""Make ``import torchvision`` work with a torch its C++ extension was not built for (tests only).

The index's torchvision wheels are linked against CUDA torch (``libc10_cuda.so``,
``libtorch_cuda.so``). With the CPU torch pin, torchvision's ``_C`` extension does not load, which
torchvision tolerates (``torchvision.extension._has_ops()`` is False and every op wrapper calls
``_assert_has_ops()`` first) — except that ``torchvision/_meta_registrations.py`` registers fake
kernels for ``torchvision::nms`` and ``torchvision::qnms`` unconditionally, and registering a kernel
for an operator that was never defined raises ``RuntimeError: operator torchvision::nms does not
exist`` during ``import torchvision``.

`ensure_torchvision_ops` fixes exactly that, before torchvision is imported:

1. torchvision already imported, not installed, or the ops already defined: nothing to do.
2. Load torchvision's ``_C`` the way ``torchvision.extension`` does (``torch.ops.load_library``,
   which is idempotent). With a matching build this defines the real ops — the same library
   torchvision's own import loads a moment later — and nothing else happens.
3. Only if ``_C`` does not load: define the missing schemas, exactly as torchvision's csrc declares
   them, in a ``FRAGMENT`` library of the ``torchvision`` namespace (as csrc's
   ``TORCH_LIBRARY_FRAGMENT`` does). No kernels: the classification and segmentation models never
   call these ops, and a call through ``torchvision.ops`` still fails with torchvision's own
   "Couldn't load custom C++ ops" error.

The returned `TorchvisionOps` says which case applied (the tests' conftest puts it in the pytest
header, so a stubbed run is never silent). See docs/real-models.md.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from dataclasses import dataclass

import torch

#: The operators torchvision's ``_meta_registrations.py`` registers fake kernels for without the
#: ``_has_ops()`` guard, with their schemas from torchvision's csrc (``ops/nms.cpp``,
#: ``ops/quantized/cpu/qnms_kernel.cpp``; the same strings are in ``_C.so``).
IMPORT_TIME_SCHEMAS: dict[str, str] = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


@dataclass(frozen=True)
class TorchvisionOps:
    """What `ensure_torchvision_ops` found and did."""

    stubbed: tuple[str, ...] = ()  # ops defined here (schema only), empty if none
    reason: str = ""  # why (torchvision's _C load error), or why nothing was needed

    def __str__(self) -> str:
        if not self.stubbed:
            return f"torchvision ops: unchanged ({self.reason})"
        ops = ", ".join(f"torchvision::{name}" for name in self.stubbed)
        return f"torchvision ops: schema-only stubs for {ops} ({self.reason})"


# Registrations live as long as their Library object: keep it for the whole process.
_library: torch.library.Library | None = None
_result: TorchvisionOps | None = None


def _op_exists(name: str) -> bool:
    return hasattr(torch.ops.torchvision, name)


def _load_extension() -> str | None:
    """Load torchvision's ``_C`` as ``torchvision.extension`` would; None if it loaded, else why."""
    spec = importlib.util.find_spec("torchvision")
    loader = (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES)
    for location in (spec.submodule_search_locations or []) if spec else []:
        ext = importlib.machinery.FileFinder(location, loader).find_spec("_C")
        if ext is None or ext.origin is None:
            continue
        try:
            torch.ops.load_library(ext.origin)
        except (ImportError, OSError) as exc:
            cause = f" ({exc.__cause__})" if exc.__cause__ else ""
            return f"torchvision's _C does not load with torch {torch.__version__}: {exc}{cause}"
        return None
    return "torchvision has no _C extension"


def ensure_torchvision_ops() -> TorchvisionOps:
    """Make sure the operators ``import torchvision`` registers kernels for exist (idempotent)."""
    global _library, _result
    if _result is not None:
        return _result
    if "torchvision" in sys.modules:
        return TorchvisionOps(reason="torchvision is already imported")
    if importlib.util.find_spec("torchvision") is None:
        return TorchvisionOps(reason="torchvision is not installed")
    if all(_op_exists(name) for name in IMPORT_TIME_SCHEMAS):
        _result = TorchvisionOps(reason="the operators are already registered")
        return _result
    why = _load_extension()
    missing = [name for name in IMPORT_TIME_SCHEMAS if not _op_exists(name)]
    if not missing:
        _result = TorchvisionOps(reason="torchvision's _C extension provides them")
        return _result
    _library = torch.library.Library("torchvision", "FRAGMENT")
    for name in missing:
        _library.define(IMPORT_TIME_SCHEMAS[name])
    _result = TorchvisionOps(stubbed=tuple(missing), reason=why or "torchvision's _C lacks them")
    return _result
