"""Export a (folded) PyTorch model: a self-contained ONNX file, or a `torch.export` program.

Both use `torch.export` with a dynamic batch dimension named ``batch``. The ONNX path is the dynamo
exporter (`torch.onnx.export(..., dynamo=True)`) followed by a fixed, explicit cleanup pipeline:

* constant folding and onnxscript's rewrite rules (e.g. the ``view(x.size(0), -1)`` shape
  arithmetic becomes one constant-shape ``Reshape``) — **without** onnxscript's BatchNorm fusion
  rules: folding is bnexport's job and is reported by `bnexport.fold`; `--no-fold` must export the
  model as it is;
* every node/value doc string and metadata entry is dropped (they carry stack traces with local
  file paths), so the same model gives a byte-identical file on any machine;
* the model's ``metadata_props`` hold only what the caller passes (plus bnexport/torch versions).

The exporter's console output (prints, warnings, log records) is captured; it appears only in the
`ExportError` raised when an export fails.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bnexport import __version__
from bnexport.errors import ExportError
from bnexport.files import atomic_path, sha256_file

if TYPE_CHECKING:
    import onnx
    import onnx_ir
    import torch

DEFAULT_OPSET = 20
DEFAULT_CHECK_BATCH = 64  # batch size check_program feeds
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
)


@dataclass(frozen=True)
class ExportResult:
    """A written ONNX file: where, what it holds, and its hash."""

    path: Path
    op_counts: dict[str, int]
    sha256: str
    opset: int
    num_nodes: int
    input_name: str = "input"
    output_names: tuple[str, ...] = ("logits",)
    size_bytes: int = 0
    metadata: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "sha256": self.sha256,
            "opset": self.opset,
            "num_nodes": self.num_nodes,
            "op_counts": dict(self.op_counts),
            "input_name": self.input_name,
            "output_names": list(self.output_names),
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


@dataclass(frozen=True)
class ProgramCheck:
    """The saved program, loaded back as a user would, against the unfolded model (fp32, CPU).

    One comparison per output over every input sample (`bnexport.parity.compare`): max abs error,
    error relative to the output's scale, cosine, argmax agreement, and the tolerance that would
    have passed.
    """

    passed: bool
    outputs: list[Any]  # bnexport.parity.compare.OutputComparison, one per output
    samples: int
    batch_size: int
    tolerance: Any  # bnexport.parity.tolerance.Tolerance
    inputs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "samples": self.samples,
            "batch_size": self.batch_size,
            "tolerance": self.tolerance.to_dict(),
            "outputs": [o.to_dict() for o in self.outputs],
            "inputs": dict(self.inputs),
        }


def export_onnx(
    model: torch.nn.Module,
    example_input: torch.Tensor,
    path: str | os.PathLike[str],
    *,
    opset: int = DEFAULT_OPSET,
    input_name: str = "input",
    output_name: str = "logits",
    metadata: Mapping[str, Any] | None = None,
) -> ExportResult:
    """Export `model` to one self-contained, checked, deterministic ONNX file at `path`.

    The first dimension of the input and of every output is dynamic and named ``batch``.
    `metadata` becomes the model's ``metadata_props`` (non-string values are JSON-encoded);
    ``bnexport_version`` and ``torch_version`` are added unless given. The file is written
    atomically: on any error nothing is left at `path`. Raises `ExportError`.
    """
    import onnx
    import torch

    program = _export_onnx_program(model, example_input, opset)
    ir_model = program.model
    _rename_io(ir_model, input_name, output_name)
    _check_batch_dims(ir_model)
    _cleanup(ir_model)
    props = _metadata_props(metadata, torch.__version__)
    proto = _to_proto(ir_model, props)

    produced = _default_opset(proto)
    if produced != opset:
        raise ExportError(
            f"opset {opset} was asked for but the exporter produced opset {produced} (it cannot "
            f"convert this model to {opset}); use --opset {produced} or newer"
        )
    size = proto.ByteSize()
    if size > _PROTOBUF_LIMIT:
        raise ExportError(
            f"the ONNX model is {size / 2**30:.2f} GiB, over protobuf's 2 GiB limit for a single "
            "self-contained file; shrink the model (e.g. export in float16)"
        )
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:
        raise ExportError(
            f"the exported ONNX model fails onnx.checker (full_check): {exc}"
        ) from exc

    data = proto.SerializeToString(deterministic=True)
    with _writable(path), atomic_path(path) as tmp:
        tmp.write_bytes(data)
    final = Path(path)
    counts = Counter(node.op_type for node in proto.graph.node)
    return ExportResult(
        path=final,
        op_counts=dict(sorted(counts.items())),
        sha256=sha256_file(final),
        opset=produced,
        num_nodes=len(proto.graph.node),
        input_name=input_name,
        output_names=tuple(o.name for o in proto.graph.output),
        size_bytes=len(data),
        metadata=props,
    )


def save_program(
    model: torch.nn.Module,
    example_input: torch.Tensor,
    path: str | os.PathLike[str],
) -> ProgramResult:
    """Save `model` as a self-contained `torch.export` program (.pt2) with a dynamic batch dim.

    The file holds the graph of aten ops and the weights, no Python code: it loads with
    `torch.export.load(path).module()` in a process where bnexport is not installed. Same model
    and example input, same bytes. Written atomically. Raises `ExportError`.
    """
    import torch

    x = _example_batch(example_input)
    with quiet_exporter() as log, _eval_mode(model), torch.inference_mode(False):
        try:
            program = torch.export.export(model, (x,), dynamic_shapes=_dynamic_shapes())
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


def check_program(
    path: str | os.PathLike[str],
    reference: torch.nn.Module,
    *,
    input_shape: tuple[int, ...],
    normalize: Any = None,
    batch_size: int = DEFAULT_CHECK_BATCH,
    tolerance: Any = None,
    inputs: Any = None,
) -> ProgramCheck:
    """Compare the program saved at `path` with the unfolded `reference` on the same inputs.

    The program is loaded with `torch.export.load` (as a user would), so this checks the artifact,
    not the in-memory module. Inputs are `bnexport.parity`'s: the bundled Fashion-MNIST images
    when `normalize` is known and the input is one 28×28 image, seeded random samples and edge
    cases. An element passes when ``|a − r| <= atol + rtol·|r|`` with the ``torch`` tolerance
    (`bnexport.parity.tolerance.DEFAULT_TOLERANCES`) unless `tolerance` is given. Raises
    `ExportError` when the program cannot be loaded or run.
    """
    import torch

    from bnexport.parity.compare import compare_output
    from bnexport.parity.inputs import InputConfig, TensorSpec, build_inputs
    from bnexport.parity.runners import TorchRunner, name_outputs
    from bnexport.parity.tolerance import DEFAULT_TOLERANCES

    tol = tolerance or DEFAULT_TOLERANCES["torch"]
    with quiet_exporter() as log:
        try:
            program = torch.export.load(str(path))
            module = program.module()
        except Exception as exc:
            raise _export_failure(
                f"loading {path} with torch.export.load", exc, log.getvalue()
            ) from exc
    n_out = len(program.graph_signature.user_outputs)
    out_names = ["logits"] if n_out == 1 else [f"logits_{i}" for i in range(n_out)]
    spec = TensorSpec("input", (None, *input_shape), np.dtype(np.float32))
    feed = build_inputs(
        [spec], inputs or InputConfig(), normalize=normalize, input_shape=input_shape
    )
    ref_runner = TorchRunner(reference, ["input"], out_names, name="torch-fp32")

    def run_program(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # An exported program's module refuses .eval(): call it as is (it has no modes).
        x = torch.from_numpy(np.array(batch["input"], copy=True))
        with torch.inference_mode():
            return name_outputs(module(x), out_names, "the saved program")

    chunks: dict[str, dict[str, list[np.ndarray]]] = {"ref": {}, "cand": {}}
    for batch in feed.batches(batch_size):
        for key, run in (("ref", ref_runner.infer), ("cand", run_program)):
            try:
                out = run(batch)
            except Exception as exc:
                what = "the saved program" if key == "cand" else "the unfolded model"
                raise ExportError(
                    f"running {what} on a batch of {len(batch['input'])} failed: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            for name, arr in out.items():
                chunks[key].setdefault(name, []).append(arr)
    comparisons = [
        compare_output(
            name,
            np.concatenate(chunks["cand"][name]),
            np.concatenate(chunks["ref"][name]),
            tol,
            locate=feed.locate,
        )
        for name in out_names
    ]
    return ProgramCheck(
        passed=all(c.passed for c in comparisons),
        outputs=comparisons,
        samples=feed.size,
        batch_size=batch_size,
        tolerance=tol,
        inputs=feed.summary(),
    )


def build_metadata(source: Any, fold_report: Any = None) -> dict[str, Any]:
    """The ONNX ``metadata_props`` bnexport records for a model from `bnexport.source`.

    `source` is a `ModelSource`; `fold_report` the `FoldReport` (None: exported unfolded).
    Keys whose value is unknown (no checkpoint hash, no temperature, no normalization) are left
    out rather than written as placeholders.
    """
    meta: dict[str, Any] = {
        "source_name": source.name,
        "source_sha256": source.sha256,
        "input_shape": list(source.input_shape),
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


def _export_onnx_program(model: torch.nn.Module, example_input: torch.Tensor, opset: int) -> Any:
    """Run the dynamo exporter quietly, unoptimized (bnexport runs its own cleanup)."""
    import torch

    x = _example_batch(example_input)
    with quiet_exporter() as log, _eval_mode(model), torch.inference_mode(False):
        try:
            program = torch.onnx.export(
                model,
                (x,),
                None,
                dynamo=True,
                dynamic_shapes=_dynamic_shapes(),
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


def _example_batch(example_input: torch.Tensor) -> torch.Tensor:
    """The example batch, at least 2 long: torch.export specializes a batch of 1 to a constant."""
    import torch

    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 1:
        raise ExportError(
            "the example input must be a tensor with a batch dimension, got "
            f"{type(example_input).__name__} {tuple(getattr(example_input, 'shape', ()))}"
        )
    x = example_input.detach()
    if x.shape[0] < 2:
        x = x.expand(2, *x.shape[1:]).clone()
    return x


def _dynamic_shapes() -> tuple[dict[int, Any]]:
    import torch

    return ({0: torch.export.Dim(BATCH_DIM)},)


def _export_failure(stage: str, exc: BaseException, captured: str) -> ExportError:
    """An ExportError naming the stage, the cause and the tail of what the exporter printed."""
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


def _rename_io(ir_model: onnx_ir.Model, input_name: str, output_name: str) -> None:
    """Name the graph input `input_name` and the output(s) `output_name` (`_0`, `_1`, … if many)."""
    graph = ir_model.graph
    if len(graph.inputs) != 1:
        raise ExportError(
            f"expected the exported graph to have 1 input, got {len(graph.inputs)}: "
            f"{[v.name for v in graph.inputs]}"
        )
    graph.inputs[0].name = input_name
    outputs = list(graph.outputs)
    if len(outputs) == 1:
        outputs[0].name = output_name
    else:
        for i, value in enumerate(outputs):
            value.name = f"{output_name}_{i}"


def _check_batch_dims(ir_model: onnx_ir.Model) -> None:
    """The input's and every output's first dimension must be the symbolic ``batch``.

    The exporter does not fail on a model that, e.g., reshapes with a literal batch size: it
    exports a graph whose output has a fixed first dimension. That is no dynamic-batch model.
    """
    import onnx_ir as ir

    graph = ir_model.graph
    first = graph.inputs[0].shape[0] if graph.inputs[0].shape else None
    if not isinstance(first, ir.SymbolicDim):
        raise ExportError(
            f"the exported input {graph.inputs[0].name!r} has a fixed first dimension ({first}); "
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


def _rewrite_rules() -> list[Any]:
    from onnxscript.rewriter.rules import common

    return [getattr(common, name) for name in _REWRITE_RULE_NAMES]


def _cleanup(ir_model: onnx_ir.Model, iterations: int = 2) -> None:
    """Constant-fold, rewrite (no BN fusion), drop dead nodes, and strip path-dependent metadata."""
    import onnx_ir as ir
    import onnx_ir.passes.common as passes
    import onnxscript.optimizer as optimizer
    from onnxscript import rewriter

    rules = _rewrite_rules()
    with quiet_exporter() as log:
        try:
            passes.InlinePass()(ir_model)
            for _ in range(iterations):
                folded = optimizer.fold_constants(ir_model)
                before = _signature(ir_model)
                rewriter.rewrite(ir_model, pattern_rewrite_rules=rules)
                if not folded.modified and _signature(ir_model) == before:
                    break
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


def _signature(ir_model: onnx_ir.Model) -> tuple[str, ...]:
    return tuple(node.op_type for node in ir_model.graph)


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
