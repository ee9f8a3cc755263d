"""The ONNX graph cleanup after the dynamo exporter: constant folding and onnxscript's default
rewrite rules without its BatchNorm fusions (added back as a second stage for a folded model), dead
nodes and functions removed, constants lifted and deduplicated, and every doc string and metadata
entry dropped (they carry stack traces with local file paths), so the same model gives a
byte-identical file on any machine."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

from bnexport.errors import ExportError
from bnexport.export.exporter import export_failure, quiet_exporter
from bnexport.scopes import (
    NAME_SCOPES_KEY,
    ModuleOutput,
    NodeScope,
    module_outputs,
    parse_name_scopes,
)

if TYPE_CHECKING:
    import onnx_ir

#: onnxscript's BatchNormalization fusions (into Conv, ConvTranspose, Gemm): left out of the first
#: stage, so an unfolded model (`--no-fold`) is exported as it is; the second stage
#: (``fuse_batchnorm``, for a folded model) adds them back.
BN_FUSION_RULE_NAMES: tuple[str, ...] = (
    "fuse_batchnorm_into_conv_rule",
    "fuse_batchnorm_into_conv_transpose_rule",
    "fuse_batchnorm_into_gemm_rule",
)


def rewrite_rules() -> tuple[list[Any], list[Any]]:
    """``(first stage, BatchNorm fusions)``: onnxscript's default rewrite rules, the ones
    ``onnxscript.rewriter.rewrite`` applies when given none, split by `BN_FUSION_RULE_NAMES`.

    onnxscript keeps its default set in a private tuple; reading it (rather than copying its
    rule names here) follows onnxscript's own choice of rules, and its absence is an error that
    names the onnxscript version, not a silently different cleanup.
    """
    import onnxscript
    from onnxscript import rewriter
    from onnxscript.rewriter.rules import common

    defaults = getattr(rewriter, "_DEFAULT_REWRITE_RULES", None)
    if defaults is None:
        raise ExportError(
            f"onnxscript {onnxscript.__version__} has no default rewrite rule set "
            "(onnxscript.rewriter._DEFAULT_REWRITE_RULES); install the onnxscript version "
            "constraints.txt pins"
        )
    bn = [getattr(common, name) for name in BN_FUSION_RULE_NAMES]
    return [r for r in defaults if all(r is not b for b in bn)], bn


class CleanupResult(NamedTuple):
    """What the cleanup did: BatchNormalization nodes the second stage fused, and each module
    call's output value, read from the exporter's node metadata before it is stripped
    (`bnexport.scopes`)."""

    fused: int
    module_outputs: list[ModuleOutput]


def cleanup(
    ir_model: onnx_ir.Model, *, fuse_batchnorm: bool = False, iterations: int = 2
) -> CleanupResult:
    """Constant-fold, rewrite (BN fusion only with `fuse_batchnorm`, as a second stage), drop dead
    nodes, read the module-output table, and strip path-dependent metadata."""
    import onnx_ir as ir
    import onnx_ir.passes.common as passes

    rules, bn_rules = rewrite_rules()
    fused = 0
    with quiet_exporter() as log:
        try:
            passes.InlinePass()(ir_model)
            _rewrite(ir_model, rules, iterations)
            if fuse_batchnorm:
                before = _count(ir_model, "BatchNormalization")
                _rewrite(ir_model, [*rules, *bn_rules], iterations)
                fused = before - _count(ir_model, "BatchNormalization")
            ir.passes.Sequential(
                passes.RemoveUnusedNodesPass(),
                passes.RemoveUnusedFunctionsPass(),
                passes.RemoveUnusedOpsetsPass(),
                passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
                passes.DeduplicateInitializersPass(),
                passes.CommonSubexpressionEliminationPass(),
                passes.NameFixPass(),
            )(ir_model)
            table = _module_outputs(ir_model)
            passes.ClearMetadataAndDocStringPass()(ir_model)
        except Exception as exc:
            raise export_failure("ONNX graph cleanup (onnxscript)", exc, log.getvalue()) from exc
    _strip_value_metadata(ir_model)
    return CleanupResult(fused, table)


def _module_outputs(ir_model: onnx_ir.Model) -> list[ModuleOutput]:
    """The module-output table of the final graph, from the exporter's ``name_scopes`` tags."""
    nodes = [
        NodeScope(
            tuple(v.name or "" if v is not None else "" for v in node.inputs),
            tuple(v.name or "" for v in node.outputs),
            parse_name_scopes(node.metadata_props.get(NAME_SCOPES_KEY)),
        )
        for node in ir_model.graph
    ]
    floats = {
        v.name
        for node in ir_model.graph
        for v in node.outputs
        if v.dtype is not None and v.dtype.is_floating_point()
    }
    graph_outputs = (v.name or "" for v in ir_model.graph.outputs)
    return module_outputs(nodes, graph_outputs, floats.__contains__)


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
