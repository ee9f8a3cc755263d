"""onnxruntime's vocabulary as bnexport names it: providers, optimization levels, execution modes.

A leaf: `bnexport.ort` (the session factory) and `bnexport.ort_config` (the settings a file
carries) both read these tables, so neither needs the other's private names. Three spellings of
one setting live here side by side: bnexport's name (``"extended"``), the attribute of
onnxruntime's Python enum (``GraphOptimizationLevel.ORT_ENABLE_EXTENDED``) and the integer code
onnxruntime's C API and a model's ``ort_config`` use (``2``).
"""

from __future__ import annotations

from typing import Literal

Provider = Literal["cpu", "cuda"]
OptLevel = Literal["disabled", "basic", "extended", "all"]
ExecutionMode = Literal["sequential", "parallel"]

#: bnexport's provider names → onnxruntime's execution provider names.
PROVIDER_NAMES: dict[str, str] = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
}

#: Graph optimization level → the attribute of ``onnxruntime.GraphOptimizationLevel``.
OPT_LEVEL_ATTRS: dict[str, str] = {
    "disabled": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}
#: Execution mode → the attribute of ``onnxruntime.ExecutionMode``.
EXECUTION_MODE_ATTRS: dict[str, str] = {
    "sequential": "ORT_SEQUENTIAL",
    "parallel": "ORT_PARALLEL",
}

#: onnxruntime's integer codes (``GraphOptimizationLevel``, ``ExecutionMode`` in its C API).
OPT_LEVEL_CODES: dict[str, int] = {"disabled": 0, "basic": 1, "extended": 2, "all": 99}
EXECUTION_MODE_CODES: dict[str, int] = {"sequential": 0, "parallel": 1}
