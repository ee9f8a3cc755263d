"""Export a (folded) PyTorch model: a self-contained ONNX file, or a `torch.export` program.

Both use `torch.export` with a dynamic first dimension named ``batch`` on every input and output.
A model takes any number of positional tensor inputs (float, integer or bool). ONNX names: the
inputs are the forward's positional parameter names; a single output is ``output``, a dict's
outputs keep its keys (``out``, ``aux``), any other structure gives ``output_0``, ``output_1``, …
(flattened in `torch.utils._pytree` order); the caller may pass both. The ONNX path is the dynamo
exporter (`torch.onnx.export(..., dynamo=True)`) followed by a fixed, explicit cleanup pipeline:

* constant folding and onnxscript's rewrite rules (e.g. the ``view(x.size(0), -1)`` shape
  arithmetic becomes one constant-shape ``Reshape``) — **without** onnxscript's BatchNorm fusion
  rules, so an unfolded model (`--no-fold`) is exported as it is;
* with ``fuse_batchnorm`` (the model was folded by `bnexport.fold`), a second stage adds
  onnxscript's BatchNorm fusion rules (into Conv, ConvTranspose, Gemm), so whatever BatchNorm the
  fold left that the exporter's own rules can fuse is fused: bnexport's ONNX never keeps a
  ``BatchNormalization`` that `torch.onnx.export(dynamo=True)` would have removed;
* every node/value doc string and metadata entry is dropped (they carry stack traces with local
  file paths), so the same model gives a byte-identical file on any machine;
* the model's ``metadata_props`` hold only what the caller passes (plus bnexport/torch versions).

The exporter's console output (prints, warnings, log records) is captured; it appears only in the
`ExportError` raised when an export fails.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnexport import __version__
from bnexport.defaults import DEFAULT_OPSET, opset_problem
from bnexport.errors import ExportError, raise_if_interrupted
from bnexport.files import atomic_path, sha256_file
from bnexport.signature import default_input_names, default_output_names

if TYPE_CHECKING:
    import onnx
    import onnx_ir
    import torch

BATCH_DIM = "batch"
PRODUCER_NAME = "bnexport"
# ONNX protobufs cannot exceed 2 GiB; bigger models would need an external-data sidecar.
_PROTOBUF_LIMIT = 2**31 - 1
# How much captured exporter output an ExportError carries.
_TAIL_CHARS = 1500
# Loggers whose handlers write straight to the console during an export.
_NOISY_LOGGERS = ("torch", "onnx", "onnxscript", "onnx_ir")

# onnxscript's default rewrite rules minus the BatchNormalization fusions (see module docstring).
_REWRITE_RULE_NAMES = (
    "add_0_rule",
    "sub_0_rule",
    "mul_by_1_rule",
    "div_by_1_rule",
    "dropout_zero_rule",
    "dropout_inference_rule",
    "two_reshapes_matmul_reshape_rule",
    "one_reshape_matmul_reshape_rule",
    "cast_constant_of_shape_rule",
    "cast_constant_of_shape_without_value_rule",
    "collapse_slice_rule",
    "collapse_slice2_rule",
    "materialize_reshape_shape_rule",
    "min_min_rule",
    "max_max_rule",
    "min_max_rule",
    "max_min_rule",
    "successive_clip_relu_rule",
    "successive_relu_clip_rule",
    "successive_relu_rule",
    "successive_clip_rule",
    "cast_cast_rule",
    "no_op_cast_rule",
    "no_op_expand_rule",
    "flatten_to_reshape_rule",
    "reshape_reshape_rule",
    "slice_split_rule",
    "no_op_transpose_rule",
    "transpose_transpose_rule",
    "unsqueeze_unsqueeze_rule",
    "squeeze_reshape_1d_rule",
    "no_op_dynamic_scatter_nd_rule",
    "no_op_static_scatter_nd_rule",
    "normalize_pad_format_conv_rule",
    "fuse_pad_into_conv_rule",
    "remove_optional_bias_from_conv_rule",
    "remove_optional_bias_from_conv_transpose_rule",
    "remove_optional_bias_from_gemm_rule",
    "normalize_pad_format_conv_integer_rule",
    "fuse_pad_into_conv_integer_rule",
    "remove_optional_bias_from_qlinear_conv_rule",
)
# The second stage (``fuse_batchnorm``): onnxscript's BatchNormalization fusions.
_BN_FUSION_RULE_NAMES = (
    "fuse_batchnorm_into_conv_rule",
    "fuse_batchnorm_into_conv_transpose_rule",
    "fuse_batchnorm_into_gemm_rule",
)


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


@dataclass(frozen=True)
class ProgramResult:
    """A written `torch.export` program (.pt2): where, which aten ops it calls, and its hash."""

    path: Path
    op_counts: dict[str, int]
    sha256: str
    num_nodes: int
    size_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "sha256": self.sha256,
            "num_nodes": self.num_nodes,
            "op_counts": dict(self.op_counts),
            "size_bytes": self.size_bytes,
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
    fused = _cleanup(ir_model, fuse_batchnorm=fuse_batchnorm)
    props = _metadata_props(metadata, torch.__version__)
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

    with _writable(path), atomic_path(path) as tmp:
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


def _names(names: Sequence[str] | None, what: str) -> tuple[str, ...] | None:
    if names is None:
        return None
    if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):
        raise ExportError(f"{what} must be a sequence of non-empty strings, got {names!r}")
    return tuple(names)


def save_program(
    model: torch.nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    path: str | os.PathLike[str],
) -> ProgramResult:
    """Save `model` as a self-contained `torch.export` program (.pt2), every input's first
    dimension dynamic (`example_inputs`: a tensor or a tuple of positional inputs).

    The file holds the graph of aten ops and the weights, no Python code: it loads with
    `torch.export.load(path).module()` in a process where bnexport is not installed. Same model
    and example input, same bytes. Written atomically. Raises `ExportError`.
    """
    import torch

    inputs = example_batches(example_inputs)
    with quiet_exporter() as log, _eval_mode(model), torch.inference_mode(False):
        try:
            program = torch.export.export(
                model, inputs, dynamic_shapes=dynamic_batch_shapes(inputs)
            )
        except Exception as exc:
            raise _export_failure("torch.export", exc, log.getvalue()) from exc
        _check_program_batch(program)
        for node in program.graph.nodes:  # stack traces name local files: not reproducible
            node.meta.pop("stack_trace", None)
        # Saving through a file object names the archive folder "archive", not the temp file.
        with _writable(path), atomic_path(path) as tmp, open(tmp, "wb") as fh:
            try:
                torch.export.save(program, fh)
            except Exception as exc:
                raise _export_failure("torch.export.save", exc, log.getvalue()) from exc
    final = Path(path)
    nodes = [n for n in program.graph.nodes if n.op == "call_function"]
    counts = Counter(str(n.target) for n in nodes)
    return ProgramResult(
        path=final,
        op_counts=dict(sorted(counts.items())),
        sha256=sha256_file(final),
        num_nodes=len(nodes),
        size_bytes=final.stat().st_size,
    )


def build_metadata(source: Any, fold_report: Any = None) -> dict[str, Any]:
    """The ONNX ``metadata_props`` bnexport records for a model from `bnexport.source`.

    `source` is a `ModelSource`; `fold_report` the `FoldReport` (None: exported unfolded).
    ``weights_sha256`` fingerprints the unfolded model's weights (`bnexport.fingerprint`). Keys
    whose value is unknown (no checkpoint hash, no temperature, no normalization) are left out
    rather than written as placeholders.
    """
    from bnexport.fingerprint import METADATA_KEY, weights_sha256

    meta: dict[str, Any] = {
        "source_name": source.name,
        "source_sha256": source.sha256,
        METADATA_KEY: weights_sha256(source.model),
        "inputs": [
            {"name": n, "shape": list(s.shape), "dtype": s.dtype}
            for n, s in zip(source.input_names, source.input_specs, strict=True)
        ],
        "temperature": source.temperature,
        "folded": "true" if fold_report is not None else "false",
    }
    if fold_report is not None:
        meta["folded_layers"] = [e.bn for e in fold_report.folded]
        meta["left_layers"] = [e.bn for e in fold_report.left]
    if source.normalize is not None:
        meta["normalize_mean"] = source.normalize.mean
        meta["normalize_std"] = source.normalize.std
    return {k: v for k, v in meta.items() if v is not None}


def _export_onnx_program(
    model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], opset: int
) -> Any:
    """Run the dynamo exporter quietly, unoptimized (bnexport runs its own cleanup)."""
    import torch

    with quiet_exporter() as log, _eval_mode(model), torch.inference_mode(False):
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
            raise _export_failure("torch.onnx.export (dynamo)", exc, log.getvalue()) from exc
    if program is None:  # pragma: no cover - dynamo=True always returns a program
        raise ExportError("torch.onnx.export returned no program")
    return program


def example_batches(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    """The example inputs as a tuple of batches of one size, at least 2 long (torch.export
    specializes a batch of 1 to a constant)."""
    import torch

    inputs = (
        tuple(example_inputs) if isinstance(example_inputs, tuple | list) else (example_inputs,)
    )
    if not inputs:
        raise ExportError("no example inputs: pass a tensor or a tuple of tensors")
    for i, x in enumerate(inputs):
        if not isinstance(x, torch.Tensor) or x.dim() < 1:
            raise ExportError(
                f"example input {i} must be a tensor with a batch dimension, got "
                f"{type(x).__name__} {tuple(getattr(x, 'shape', ()))}"
            )
    batches = {int(x.shape[0]) for x in inputs}
    if len(batches) > 1:
        raise ExportError(
            f"the example inputs have different batch sizes {sorted(batches)}; the first "
            "dimension of every input is the batch"
        )
    out = tuple(x.detach() for x in inputs)
    if batches == {1}:
        out = tuple(x.expand(2, *x.shape[1:]).clone() for x in out)
    return out


def dynamic_batch_shapes(inputs: tuple[torch.Tensor, ...]) -> tuple[dict[int, Any], ...]:
    """One ``batch`` dimension shared by every input."""
    import torch

    batch = torch.export.Dim(BATCH_DIM)
    return tuple({0: batch} for _ in inputs)


def _export_failure(stage: str, exc: BaseException, captured: str) -> ExportError:
    """An ExportError naming the stage, the cause and the tail of what the exporter printed.

    A Ctrl-C the exporter turned into another exception is raised as the KeyboardInterrupt it is.
    """
    raise_if_interrupted(exc)
    cause = " ".join(f"{type(exc).__name__}: {exc}".split())
    if len(cause) > _TAIL_CHARS:
        cause = cause[:_TAIL_CHARS] + " …"
    tail = " ".join(captured.split())[-_TAIL_CHARS:]
    hint = ""
    if "batch" in cause and ("Constraint" in cause or "specializ" in cause):
        hint = " (the model fixes the batch size; make it work for any batch size)"
    message = f"{stage} failed{hint}: {cause}"
    if tail:
        message += f" | exporter output: …{tail}"
    return ExportError(message)


@contextlib.contextmanager
def _writable(path: str | os.PathLike[str]) -> Iterator[None]:
    """Turn a failure to create or replace `path` into an ExportError naming it."""
    try:
        yield
    except OSError as exc:
        raise ExportError(f"cannot write {path}: {exc.strerror or exc}") from exc


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Trace with inference semantics; give the caller's model its training flags back."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def quiet_exporter() -> Iterator[io.StringIO]:
    """Capture stdout, stderr, warnings and the torch/onnx loggers' output into one buffer."""
    buffer = io.StringIO()
    capture = logging.StreamHandler(buffer)
    capture.setLevel(logging.INFO)  # torch's structured-trace DEBUG records are not output
    capture.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    swapped: list[tuple[logging.Logger, list[logging.Handler]]] = []
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if (
            isinstance(logger, logging.Logger)
            and logger.handlers
            and name.split(".")[0] in _NOISY_LOGGERS
        ):
            swapped.append((logger, logger.handlers[:]))
            logger.handlers = [capture]
    try:
        with (
            contextlib.redirect_stdout(buffer),
            contextlib.redirect_stderr(buffer),
            warnings.catch_warnings(record=True) as caught,
        ):
            warnings.simplefilter("always")
            try:
                yield buffer
            finally:
                for w in caught:
                    buffer.write(f"{w.category.__name__}: {w.message}\n")
    finally:
        for logger, handlers in swapped:
            logger.handlers = handlers


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


def _check_program_batch(program: Any) -> None:
    """Every output of the `torch.export` program keeps the symbolic batch dimension first."""
    import torch
    from torch.utils._pytree import tree_leaves

    output = next(n for n in program.graph.nodes if n.op == "output")
    for i, node in enumerate(tree_leaves(output.args)):
        val = getattr(node, "meta", {}).get("val")
        shape = tuple(getattr(val, "shape", ()))
        if not shape or not isinstance(shape[0], torch.SymInt):
            raise ExportError(
                f"output {i} has shape {shape}: its first dimension is not the batch; the model "
                "must keep the batch dimension first, e.g. x.view(x.size(0), -1) rather than a "
                "literal batch size"
            )


def _rewrite_rules(names: Sequence[str]) -> list[Any]:
    from onnxscript.rewriter.rules import common

    return [getattr(common, name) for name in names]


def _cleanup(ir_model: onnx_ir.Model, *, fuse_batchnorm: bool = False, iterations: int = 2) -> int:
    """Constant-fold, rewrite (BN fusion only with `fuse_batchnorm`, as a second stage), drop dead
    nodes, and strip path-dependent metadata. Returns how many BatchNormalization nodes the
    second stage fused."""
    import onnx_ir as ir
    import onnx_ir.passes.common as passes

    rules = _rewrite_rules(_REWRITE_RULE_NAMES)
    fused = 0
    with quiet_exporter() as log:
        try:
            passes.InlinePass()(ir_model)
            _rewrite(ir_model, rules, iterations)
            if fuse_batchnorm:
                before = _count(ir_model, "BatchNormalization")
                _rewrite(ir_model, [*rules, *_rewrite_rules(_BN_FUSION_RULE_NAMES)], iterations)
                fused = before - _count(ir_model, "BatchNormalization")
            ir.passes.Sequential(
                passes.RemoveUnusedNodesPass(),
                passes.RemoveUnusedFunctionsPass(),
                passes.RemoveUnusedOpsetsPass(),
                passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
                passes.DeduplicateInitializersPass(),
                passes.CommonSubexpressionEliminationPass(),
                passes.NameFixPass(),
                passes.ClearMetadataAndDocStringPass(),
            )(ir_model)
        except Exception as exc:
            raise _export_failure("ONNX graph cleanup (onnxscript)", exc, log.getvalue()) from exc
    _strip_value_metadata(ir_model)
    return fused


def _rewrite(ir_model: onnx_ir.Model, rules: list[Any], iterations: int) -> None:
    """Constant folding and `rules`, repeated until nothing changes (at most `iterations`)."""
    import onnxscript.optimizer as optimizer
    from onnxscript import rewriter

    for _ in range(iterations):
        folded = optimizer.fold_constants(ir_model)
        before = _signature(ir_model)
        rewriter.rewrite(ir_model, pattern_rewrite_rules=rules)
        if not folded.modified and _signature(ir_model) == before:
            break


def _signature(ir_model: onnx_ir.Model) -> tuple[str, ...]:
    return tuple(node.op_type for node in ir_model.graph)


def _count(ir_model: onnx_ir.Model, op_type: str) -> int:
    return sum(node.op_type == op_type for node in ir_model.graph)


def _strip_value_metadata(ir_model: onnx_ir.Model) -> None:
    """Drop doc strings and metadata on values and the model (exporter provenance, file paths)."""
    import onnx_ir as ir

    graph = ir_model.graph
    values = [*graph.inputs, *graph.outputs, *graph.initializers.values()]
    for node in ir.traversal.RecursiveGraphIterator(graph):
        values.extend(node.outputs)
    for value in values:
        value.metadata_props.clear()
        value.doc_string = None
    graph.metadata_props.clear()
    graph.doc_string = None
    ir_model.metadata_props.clear()
    ir_model.doc_string = None


def _metadata_props(metadata: Mapping[str, Any] | None, torch_version: str) -> dict[str, str]:
    """Caller's metadata as strings (JSON for non-strings), sorted, with the tool versions."""
    props: dict[str, str] = {"bnexport_version": __version__, "torch_version": torch_version}
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not key:
            raise ExportError(f"metadata keys must be non-empty strings, got {key!r}")
        if value is None:
            continue
        props[key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return dict(sorted(props.items()))


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
