"""Why onnxruntime's CUDA provider does not run here: the CPU-only package, missing CUDA libraries,
no driver or no device — what `bnexport.ort.probe_cuda` reports instead of a silent CPU run."""

from __future__ import annotations

import ctypes
import importlib.metadata
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ProbeResult:
    """Whether onnxruntime's CUDA provider really runs here, and if not, why."""

    available: bool
    reason: str
    available_providers: tuple[str, ...] = ()
    onnxruntime_version: str = ""
    packages: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def tiny_model_bytes() -> bytes:
    """A one-node ONNX model (y = x + x) used to probe a provider."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


def installed_packages() -> dict[str, str]:
    found: dict[str, str] = {}
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def diagnose_fallback() -> str:
    """Why a CUDA session fell back: the provider library, the driver, or the device."""
    import onnxruntime as ort

    capi = Path(ort.__file__).parent / "capi"
    lib = capi / "libonnxruntime_providers_cuda.so"
    if lib.exists():
        try:
            ctypes.CDLL(str(lib))
        except OSError as exc:
            return (
                f"CUDA libraries missing: {lib.name} cannot load ({exc}); install the CUDA runtime "
                "and cuDNN that this onnxruntime-gpu build needs (e.g. pip install "
                "'onnxruntime-gpu[cuda,cudnn]') or put them on LD_LIBRARY_PATH"
            )
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "no NVIDIA driver: libcuda.so.1 not found (no GPU on this machine?)"
    rc = cuda.cuInit(0)
    if rc != 0:
        return f"no usable CUDA device: cuInit failed with CUDA error {rc}"
    count = ctypes.c_int(0)
    rc = cuda.cuDeviceGetCount(ctypes.byref(count))
    if rc != 0 or count.value == 0:
        return f"no CUDA device visible (cuDeviceGetCount → error {rc}, {count.value} devices)"
    return (
        "the CUDA provider is installed and a device is visible, but onnxruntime placed the "
        "session on the CPU; rerun with log_severity_level=0 to see onnxruntime's reason"
    )


def no_cuda_provider(packages: dict[str, str], available: tuple[str, ...]) -> str:
    """Why onnxruntime offers no CUDA provider: the CPU package, or both packages installed."""
    import onnxruntime as ort

    if "onnxruntime-gpu" not in packages:
        cpu_pkg = f"onnxruntime {packages['onnxruntime']}" if "onnxruntime" in packages else ""
        return (
            f"onnxruntime-gpu is not installed (only the CPU package {cpu_pkg}; "
            f"providers {list(available)}); install it with `pip install onnxruntime-gpu` "
            "(bnexport[gpu]) in place of onnxruntime"
        )
    return (
        f"onnxruntime-gpu {packages['onnxruntime-gpu']} is installed but the imported "
        f"onnxruntime ({ort.__file__}) offers no CUDA provider "
        f"(providers {list(available)}); if both onnxruntime and onnxruntime-gpu are "
        "installed, uninstall both and reinstall onnxruntime-gpu alone"
    )
