"""Export to one self-contained, checked, deterministic ONNX file.

The dynamo exporter (`torch.onnx.export(..., dynamo=True)`) with a dynamic first dimension named
``batch`` on every input and output, then the fixed cleanup of `bnexport.export.cleanup`. Names:
the inputs are the forward's positional parameter names; a single output is ``output``, a dict's
outputs keep its keys, any other structure gives ``output_0``, ``output_1``, … (flattened in
`torch.utils._pytree` order); the caller may pass both. The model's ``metadata_props`` hold only
what the caller passes, plus the bnexport and torch versions and the module-output table
(``module_outputs``: which value each module call returns, `bnexport.scopes`), read from the
exporter's node metadata before the cleanup strips it.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnexport import __version__
from bnexport.defaults import DEFAULT_OPSET, opset_problem
from bnexport.errors import ExportError
from bnexport.export.cleanup import cleanup
from bnexport.export.exporter import (
    dynamic_batch_shapes,
    eval_mode,
    example_batches,
    export_failure,
    quiet_exporter,
    writable,
)
from bnexport.export.metadata import metadata_props
from bnexport.files import atomic_path
from bnexport.scopes import MODULE_OUTPUTS_KEY, ModuleOutput, encode_table
from bnexport.signature import default_input_names, default_output_names

if TYPE_CHECKING:
    import onnx
    import onnx_ir
    import torch

PRODUCER_NAME = "bnexport"
# ONNX protobufs cannot exceed 2 GiB; bigger models would need an external-data sidecar.
# ONNX protobufs cannot exceed 2 GiB; bigger models would need an external-data sidecar.
_PROTOBUF_LIMIT = 2**31 - 1


@dataclass(frozen=True)
class ExportResult:
    """A written ONNX file: where, what it holds, and its hash."""

    path: Path
    op_counts: dict[str, int]
    sha256: str
    opset: int
    num_nodes: int
    input_names: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ()
    size_bytes: int = 0
    metadata: dict[str, str] = field(default_factory=dict)
    bn_fused_by_onnxscript: int = 0  # BatchNormalization nodes the second stage fused

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "sha256": self.sha256,
            "opset": self.opset,
            "num_nodes": self.num_nodes,
            "op_counts": dict(self.op_counts),
            "input_names": list(self.input_names),
            "output_names": list(self.output_names),
            "bn_fused_by_onnxscript": self.bn_fused_by_onnxscript,
            "size_bytes": self.size_bytes,
            "metadata": dict(self.metadata),
        }


def export_onnx(
    model: torch.nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    path: str | os.PathLike[str],
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    opset: int = DEFAULT_OPSET,
    metadata: Mapping[str, Any] | None = None,
    fuse_batchnorm: bool = False,
) -> ExportResult:
    """Export `model` to one self-contained, checked, deterministic ONNX file at `path`.

    `example_inputs`: a tensor, or a tuple of the forward's positional inputs. The first dimension
    of every input and output is dynamic and named ``batch``. Names default as the module
    docstring says. `fuse_batchnorm`: also run onnxscript's BatchNorm fusions (for a folded
    model; `ExportResult.bn_fused_by_onnxscript` counts them). `metadata` becomes the model's
    ``metadata_props`` (non-string values are JSON-encoded); ``bnexport_version`` and
    ``torch_version`` are added unless given. The file is written atomically: on any error nothing
    is left at `path`. Raises `ExportError`.
    """
    problem = opset_problem(opset)
    if problem is not None:
        raise ExportError(problem)
    import onnx
    import torch

    inputs = example_batches(example_inputs)
    in_names = _names(input_names, "input_names") or default_input_names(model, len(inputs))
    program = _export_onnx_program(model, inputs, opset)
    ir_model = program.model
    out_spec = program.exported_program.call_spec.out_spec
    out_names = _names(output_names, "output_names") or default_output_names(out_spec)
    _rename_io(ir_model, in_names, out_names)
    _check_batch_dims(ir_model)
    cleaned = cleanup(ir_model, fuse_batchnorm=fuse_batchnorm)
    fused = cleaned.fused
    props = metadata_props(_with_table(metadata, cleaned.module_outputs), torch.__version__)
    proto = _to_proto(ir_model, props)

    produced = _default_opset(proto)
    if produced != opset:
        raise ExportError(
            f"--opset {opset}: the exporter cannot convert this model from opset {produced}, "
            f"which it writes, to {opset}; use --opset {produced}"
        )
    try:  # serialized once: checked, hashed and written from these bytes
        data = proto.SerializeToString(deterministic=True)
    except ValueError as exc:  # protobuf refuses a message over 2 GiB
        raise ExportError(
            "the ONNX model is over protobuf's 2 GiB limit for a single self-contained file; "
            f"shrink the model (e.g. export in float16) ({exc})"
        ) from None
    if len(data) > _PROTOBUF_LIMIT:
        raise ExportError(
            f"the ONNX model is {len(data) / 2**30:.2f} GiB, over protobuf's 2 GiB limit for a "
            "single self-contained file; shrink the model (e.g. export in float16)"
        )
    try:
        onnx.checker.check_model(data, full_check=True)
    except Exception as exc:
        raise ExportError(
            f"the exported ONNX model fails onnx.checker (full_check): {exc}"
        ) from exc

    with writable(path), atomic_path(path) as tmp:
        tmp.write_bytes(data)
    final = Path(path)
    counts = Counter(node.op_type for node in proto.graph.node)
    return ExportResult(
        path=final,
        op_counts=dict(sorted(counts.items())),
        sha256=hashlib.sha256(data).hexdigest(),
        opset=produced,
        num_nodes=len(proto.graph.node),
        input_names=tuple(i.name for i in proto.graph.input),
        output_names=tuple(o.name for o in proto.graph.output),
        size_bytes=len(data),
        metadata=props,
        bn_fused_by_onnxscript=fused,
    )


def _with_table(metadata: Mapping[str, Any] | None, rows: Sequence[ModuleOutput]) -> dict[str, Any]:
    """The caller's metadata plus the module-output table (`bnexport.scopes`), when there is one
    and the caller gave none: `bnexport check --localize` maps module outputs to values with it."""
    merged = dict(metadata or {})
    if rows:
        merged.setdefault(MODULE_OUTPUTS_KEY, encode_table(rows))
    return merged


def _names(names: Sequence[str] | None, what: str) -> tuple[str, ...] | None:
    if names is None:
        return None
    if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):
        raise ExportError(f"{what} must be a sequence of non-empty strings, got {names!r}")
    return tuple(names)


def _export_onnx_program(
    model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], opset: int
) -> Any:
    """Run the dynamo exporter quietly, unoptimized (bnexport runs its own cleanup)."""
    import torch

    with quiet_exporter() as log, eval_mode(model), torch.inference_mode(False):
        try:
            program = torch.onnx.export(
                model,
                inputs,
                None,
                dynamo=True,
                dynamic_shapes=dynamic_batch_shapes(inputs),
                opset_version=opset,
                optimize=False,
                external_data=False,
                verbose=False,
                report=False,
                verify=False,
            )
        except Exception as exc:
            raise export_failure("torch.onnx.export (dynamo)", exc, log.getvalue()) from exc
    if program is None:  # pragma: no cover - dynamo=True always returns a program
        raise ExportError("torch.onnx.export returned no program")
    return program


def _rename_io(
    ir_model: onnx_ir.Model, input_names: tuple[str, ...], output_names: tuple[str, ...]
) -> None:
    """Name the graph's inputs and outputs; an output that is an input or repeats another output
    gets its own value (an Identity), so every name is its own."""
    import onnx_ir as ir

    graph = ir_model.graph
    for what, values, names in (
        ("input", graph.inputs, input_names),
        ("output", graph.outputs, output_names),
    ):
        if len(values) != len(names):
            raise ExportError(
                f"the exported graph has {len(values)} {what}(s) but {len(names)} {what} names "
                f"were given: {list(names)}"
            )
    every = [*input_names, *output_names]
    if len(set(every)) != len(every):
        raise ExportError(f"input and output names must all differ, got {every}")
    seen = set(graph.inputs)
    for i, value in enumerate(list(graph.outputs)):
        if value in seen:
            node = ir.node("Identity", inputs=[value])
            graph.append(node)
            copy = node.outputs[0]
            copy.shape, copy.type = value.shape, value.type
            graph.outputs[i] = value = copy
        seen.add(value)
    for value, name in zip([*graph.inputs, *graph.outputs], every, strict=True):
        value.name = name


def _check_batch_dims(ir_model: onnx_ir.Model) -> None:
    """Every input's and output's first dimension must be the symbolic ``batch``.

    The exporter does not fail on a model that, e.g., reshapes with a literal batch size: it
    exports a graph whose output has a fixed first dimension. That is no dynamic-batch model.
    """
    import onnx_ir as ir

    graph = ir_model.graph
    first = None
    for value in graph.inputs:
        first = value.shape[0] if value.shape is not None and len(value.shape) else None
        if not isinstance(first, ir.SymbolicDim):
            raise ExportError(
                f"the exported input {value.name!r} has a fixed first dimension ({first}); "
                "the model must accept any batch size"
            )
    for value in graph.outputs:
        dim = value.shape[0] if value.shape is not None and len(value.shape) else None
        if dim != first:
            raise ExportError(
                f"output {value.name!r} has shape {value.shape}: its first dimension is not the "
                f"batch ({first}); the model must keep the batch dimension first, e.g. "
                "x.view(x.size(0), -1) rather than a literal batch size"
            )


def _to_proto(ir_model: onnx_ir.Model, props: Mapping[str, str]) -> onnx.ModelProto:
    """Serialize with bnexport's producer info and metadata_props."""
    import onnx
    import onnx_ir as ir

    ir_model.producer_name = PRODUCER_NAME
    ir_model.producer_version = __version__
    proto = ir.serde.serialize_model(ir_model)
    proto.doc_string = ""
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, dict(props))
    return proto


def _default_opset(proto: onnx.ModelProto) -> int:
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise ExportError("the exported ONNX model imports no default-domain opset")
