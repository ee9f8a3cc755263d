"""Measure what each BatchNorm-folding tool does on the cases of docs/fold-comparison.md.

For every row (a small model from ``tests/fold/zoo.py``) and every tool, the script runs the tool,
then measures — nothing is hard-coded:

* what is left: BatchNorm executions and the scale/shift chain's Mul/Div/Add/Sub (traced with a
  ``TorchFunctionMode`` for PyTorch tools; counted as ONNX nodes for ONNX tools);
* the largest error against the unfolded model run in float64, as a fraction of the output scale
  ``max(1, max|ref|)`` (a tool is "wrong" above 1e-5);
* whether a BN that is left is reported (only bnexport returns a report).

Tools: bnexport's ``fold_model``; ``torch.fx.experimental.optimization.fuse``; the manual
``torch.nn.utils.fusion.fuse_conv_bn_eval`` / ``fuse_linear_bn_eval`` (swap the layer for the
fused one and the BN for Identity, as their docs suggest); with ``--onnx`` also both torch ONNX
exporters (dynamo and TorchScript, default settings), onnxruntime's session-load fusions
(``ORT_ENABLE_EXTENDED`` on the unfused graph) and, with ``--onnx-tools-python PY``, onnxsim and
onnxoptimizer run by another interpreter (keep them out of the project's environment).

Usage::

    .venv/bin/python scripts/compare_tools.py [--onnx] [--onnx-tools-python TOOLS/bin/python]

prints a markdown table (and versions) on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "fold"))

import zoo  # noqa: E402  (the zoo lives with the tests it serves)

from bnexport.machine import cpu_model  # noqa: E402

#: ONNX node types that make up a BN or its scale/shift chain when left in a graph.
ONNX_LEFT_OPS = ("BatchNormalization", *zoo.ONNX_ARITH_OPS)


@dataclass(frozen=True)
class Row:
    """One row of the table: a zoo model and how ``torch.nn.utils.fusion`` would be applied to it.

    ``pairs`` are (layer attribute, BN attribute) for the manual fusion API; empty when the API
    has no function for the pattern (BN before the layer).
    """

    label: str
    case_name: str
    pairs: tuple[tuple[str, str], ...] = ()

    @property
    def case(self) -> zoo.ZooCase:
        return next(c for c in zoo.ZOO if c.name == self.case_name)

    @property
    def foldable(self) -> bool:
        """bnexport must fold every BN of this row (else it must report each one left)."""
        return self.case.left == 0

    def build(self) -> nn.Module:
        return self.case.build()

    def example_input(self) -> torch.Tensor:
        return self.case.example_input()


ROWS: tuple[Row, ...] = (
    Row(
        "Conv → BN → `* T` (seed's TemperatureBatchNorm2d)",
        "conv_bn_mul_t_seed",
        (("conv", "bn.bn"),),
    ),
    Row("Conv → BN → `/ T`", "conv_bn_div_t", (("conv", "bn"),)),
    Row("Conv → BN → `* buffer[1,C,1,1] + buffer`", "conv_bn_mul_buffer", (("conv", "bn"),)),
    Row("ConvTranspose2d (groups 2) → BN", "convtranspose_groups2_bn", (("conv", "bn"),)),
    Row("ConvTranspose2d (depthwise) → BN", "convtranspose_depthwise_bn", (("conv", "bn"),)),
    Row("Linear → BatchNorm1d", "linear_bn1d", (("fc", "bn"),)),
    Row("BN → Linear", "bn_linear"),
    Row("BN → Conv (pad 0)", "bn_conv_pad0"),
    Row(
        "one conv called twice, BN on one call (pytorch#104593)",
        "shared_conv_twice",
        (("conv", "bn"),),
    ),
    Row("BN that cannot fold (`track_running_stats=False`)", "untracked_stats", (("conv", "bn"),)),
)


@dataclass
class Cell:
    """What one tool did to one row."""

    bn_left: int | None = None
    ops_left: dict[str, int] | None = None
    rel_err: float | None = None
    reported: str | None = None  # the reason a left BN is reported with, if the tool reports
    error: str | None = None
    unsupported: str | None = None  # the tool has no API for this pattern
    note: str = ""

    @property
    def wrong(self) -> bool:
        return self.rel_err is not None and not self.rel_err <= zoo.REL_TOL

    def render(self) -> str:
        if self.unsupported:
            return f"n/a ({self.unsupported})"
        if self.error:
            return f"error: {self.error}"
        left = {k: v for k, v in (self.ops_left or {}).items() if v}
        parts = []
        if not left:
            parts.append("folded")
        else:
            parts.append(", ".join(f"{k}×{v}" if v > 1 else k for k, v in left.items()) + " left")
        if self.bn_left:
            parts.append(f"reported ({self.reported})" if self.reported else "silent")
        if self.rel_err is not None:
            err = f"err {self.rel_err:.1e}"
            parts.append(f"**wrong output** ({err})" if self.wrong else err)
        if self.note:
            parts.append(self.note)
        return "; ".join(parts)


def _short(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {msg[:90]}"


def _torch_cell(module: nn.Module, x: torch.Tensor, ref: torch.Tensor) -> Cell:
    out, calls = zoo.traced_calls(module, x)
    ops: dict[str, int] = {"BN": zoo.batchnorm_calls(calls)}
    for name, n in calls.items():
        if name in zoo.ARITH_FUNCS:
            key = name.strip("_").removeprefix("r").removeprefix("i").removesuffix("_")
            key = {"truediv": "div", "true_divide": "div"}.get(key, key).capitalize()
            ops[key] = ops.get(key, 0) + n
    return Cell(bn_left=ops["BN"], ops_left=ops, rel_err=zoo.compare(out, ref).rel_err)


# ---- PyTorch-level tools --------------------------------------------------------------------


def tool_bnexport(
    row: Row, model: nn.Module, x: torch.Tensor, ref: torch.Tensor, tmp: Path
) -> Cell:
    from bnexport.fold import fold_model

    result = fold_model(model, (x,))
    cell = _torch_cell(result.module, x, ref)
    left = result.report.left
    if left:
        cell.reported = ", ".join(sorted({str(e.reason_code) for e in left}))
    return cell


def tool_fx_fuse(row: Row, model: nn.Module, x: torch.Tensor, ref: torch.Tensor, tmp: Path) -> Cell:
    from torch.fx.experimental.optimization import fuse

    return _torch_cell(fuse(model), x, ref)


def _set(root: nn.Module, dotted: str, value: nn.Module) -> None:
    *parents, name = dotted.split(".")
    owner = root
    for p in parents:
        owner = getattr(owner, p)
    setattr(owner, name, value)


def tool_nn_utils_fusion(
    row: Row, model: nn.Module, x: torch.Tensor, ref: torch.Tensor, tmp: Path
) -> Cell:
    from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

    if not row.pairs:
        return Cell(unsupported="no function for BN before a layer")
    fused = copy.deepcopy(model)
    for layer_name, bn_name in row.pairs:
        layer, bn = fused.get_submodule(layer_name), fused.get_submodule(bn_name)
        if isinstance(layer, nn.Linear):
            new = fuse_linear_bn_eval(layer, bn)
        else:
            new = fuse_conv_bn_eval(
                layer, bn, transpose=isinstance(layer, nn.modules.conv._ConvTransposeNd)
            )
        _set(fused, layer_name, new)
        _set(fused, bn_name, nn.Identity())
    return _torch_cell(fused, x, ref)


# ---- ONNX-level tools -----------------------------------------------------------------------


@contextlib.contextmanager
def _quiet():
    """Silence the exporters' console chatter (they print progress and warnings)."""
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        yield


def activation_ops(graph: Any) -> Counter[str]:
    """Op types of the nodes that depend on a graph input (not weight arithmetic on constants)."""
    live = {i.name for i in graph.input} - {init.name for init in graph.initializer}
    ops: Counter[str] = Counter()
    for node in graph.node:  # ONNX graphs are topologically sorted
        if any(name in live for name in node.input):
            live.update(node.output)
            ops[node.op_type] += 1
    return ops


def _onnx_cell(path: Path, x: torch.Tensor, ref: torch.Tensor) -> Cell:
    import onnx
    import onnxruntime as ort

    ops = activation_ops(onnx.load(str(path)).graph)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    left = {("BN" if k == "BatchNormalization" else k): ops[k] for k in ONNX_LEFT_OPS}
    return Cell(
        bn_left=left["BN"], ops_left=left, rel_err=zoo.compare(torch.from_numpy(out), ref).rel_err
    )


def tool_onnx_dynamo(
    row: Row, model: nn.Module, x: torch.Tensor, ref: torch.Tensor, tmp: Path
) -> Cell:
    path = tmp / "dynamo.onnx"
    with _quiet():
        torch.onnx.export(model, (x,), str(path), dynamo=True)
    return _onnx_cell(path, x, ref)


def tool_onnx_torchscript(
    row: Row, model: nn.Module, x: torch.Tensor, ref: torch.Tensor, tmp: Path
) -> Cell:
    path = tmp / "torchscript.onnx"
    with _quiet():
        torch.onnx.export(model, (x,), str(path), dynamo=False)
    return _onnx_cell(path, x, ref)


def _unfused_onnx(model: nn.Module, x: torch.Tensor, tmp: Path) -> Path:
    """The model exported as it is (bnexport's exporter: no BatchNorm fusion rules)."""
    from bnexport.export import export_onnx

    path = tmp / "unfused.onnx"
    export_onnx(model, x, path)
    return path


def tool_ort_session(
    row: Row, model: nn.Module, x: torch.Tensor, ref: torch.Tensor, tmp: Path
) -> Cell:
    import onnxruntime as ort

    src = _unfused_onnx(model, x, tmp)
    out_path = tmp / "ort_optimized.onnx"
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(out_path)
    ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
    return _onnx_cell(out_path, x, ref)


_EXTERNAL = {
    "onnxsim": "import onnx, onnxsim, sys; m, ok = onnxsim.simplify(onnx.load(sys.argv[1])); "
    "assert ok; onnx.save(m, sys.argv[2])",
    "onnxoptimizer": "import onnx, onnxoptimizer, sys; "
    "onnx.save(onnxoptimizer.optimize(onnx.load(sys.argv[1]), "
    "onnxoptimizer.get_fuse_and_elimination_passes()), sys.argv[2])",
}


def tool_external(name: str, python: str) -> Callable[..., Cell]:
    def run(row: Row, model: nn.Module, x: torch.Tensor, ref: torch.Tensor, tmp: Path) -> Cell:
        src = _unfused_onnx(model, x, tmp)
        dst = tmp / f"{name}.onnx"
        proc = subprocess.run(
            [python, "-c", _EXTERNAL[name], str(src), str(dst)], capture_output=True, text=True
        )
        if proc.returncode:
            return Cell(error=(proc.stderr.strip().splitlines() or ["failed"])[-1][:100])
        return _onnx_cell(dst, x, ref)

    return run


# ---- driver ---------------------------------------------------------------------------------


TORCH_TOOLS: dict[str, Callable[..., Cell]] = {
    "bnexport": tool_bnexport,
    "torch.fx fuse": tool_fx_fuse,
    "torch.nn.utils.fusion": tool_nn_utils_fusion,
}
ONNX_TOOLS: dict[str, Callable[..., Cell]] = {
    "torch.onnx (dynamo)": tool_onnx_dynamo,
    "torch.onnx (TorchScript)": tool_onnx_torchscript,
    "ORT session load": tool_ort_session,
}


def measure(
    row: Row, tool: str | Callable[..., Cell], *, onnx_tools_python: str | None = None
) -> Cell:
    """Run ``tool`` (name or function) on ``row``'s model; measure what is left and the error."""
    tools = TORCH_TOOLS | ONNX_TOOLS
    if onnx_tools_python:
        tools |= {n: tool_external(n, onnx_tools_python) for n in _EXTERNAL}
    fn = tools[tool] if isinstance(tool, str) else tool
    model = row.build()
    x = row.example_input()
    ref = zoo.reference_output(zoo.float64_reference(model), x)
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        try:
            return fn(row, model, x, ref, Path(tmp))
        except Exception as exc:  # a tool failing is a measured outcome, not a script failure
            return Cell(error=_short(exc))


def versions(onnx_tools_python: str | None) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("bnexport", "torch", "onnx", "onnxscript", "onnxruntime"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    if onnx_tools_python:
        code = (
            "import importlib.metadata as m, json; "
            "print(json.dumps({d: m.version(d) for d in ('onnxsim', 'onnxoptimizer', 'onnx')}))"
        )
        proc = subprocess.run([onnx_tools_python, "-c", code], capture_output=True, text=True)
        if proc.returncode == 0:
            out |= {f"{k} (external)": v for k, v in json.loads(proc.stdout).items()}
    return out


def table(tools: tuple[str, ...], rows: tuple[Row, ...] = ROWS, **kw: Any) -> str:
    """The markdown table: one row per case, one column per tool."""
    lines = ["| case | " + " | ".join(tools) + " |", "| --- |" + " --- |" * len(tools)]
    for row in rows:
        cells = [measure(row, tool, **kw).render() for tool in tools]
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--onnx", action="store_true", help="also measure the ONNX exporters and ORT"
    )
    parser.add_argument(
        "--onnx-tools-python", help="interpreter with onnxsim + onnxoptimizer installed"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    tools = tuple(TORCH_TOOLS)
    if args.onnx:
        tools += tuple(ONNX_TOOLS)
    if args.onnx_tools_python:
        tools += tuple(_EXTERNAL)
    print(table(tools, onnx_tools_python=args.onnx_tools_python))
    print()
    flags = ["--onnx"] * args.onnx + ["--onnx-tools-python PY"] * bool(args.onnx_tools_python)
    print(
        f"measured {dt.date.today().isoformat()} on {cpu_model()}, {os.cpu_count()} CPUs, "
        f"{platform.platform()}; command: python scripts/compare_tools.py {' '.join(flags)}; "
        "versions:"
    )
    print(", ".join(f"{k} {v}" for k, v in versions(args.onnx_tools_python).items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
