"""The exported graph's side of localization: which value each module call returns (the file's
module-output table, or torch's node tags), which values are cuts, which nodes compute a value,
and a copy of the model with chosen values marked as extra outputs (Polygraphy's ``--onnx-outputs``;
the user's file is never touched: the copy lives in memory and goes to onnxruntime as bytes).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from bnexport.scopes import (
    MODULE_OUTPUTS_KEY,
    NAME_SCOPES_KEY,
    ModuleOutput,
    NodeScope,
    decode_table,
    module_outputs,
    parse_name_scopes,
)

if TYPE_CHECKING:
    import onnx

#: Where a graph's module-output table came from (`GraphView.source`).
TABLE_SOURCES = {
    "table": f"the file's {MODULE_OUTPUTS_KEY} metadata (written by bnexport's export)",
    "name_scopes": f"the exporter's node tags ({NAME_SCOPES_KEY})",
    "none": "nothing: the file records no module paths",
}


@dataclass
class GraphView:
    """What localization needs of an ONNX graph, read once (:func:`read_graph`)."""

    proto: onnx.ModelProto
    table: list[ModuleOutput]
    source: str  # a key of TABLE_SOURCES
    producer: dict[str, int]  # value → index of the node that computes it
    dtypes: dict[str, int]  # value → onnx elem type, where known
    shapes: dict[str, tuple[int | None, ...]]  # value → dims (None: symbolic), where known
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    initializers: frozenset[str]
    cuts: frozenset[str] = field(default_factory=frozenset)
    note: str = ""

    def position(self, value: str) -> int:
        """Where ``value`` is computed in the graph's node order (-1: a graph input)."""
        return self.producer.get(value, -1)

    def computing_nodes(self, value: str, stops: Iterable[str]) -> list[str]:
        """The nodes that compute ``value`` from the values in ``stops`` (other layers' values,
        graph inputs, initializers): ``"OpType name"``, in graph order."""
        nodes = self.proto.graph.node
        stop = set(stops) | set(self.inputs) | self.initializers
        seen: set[int] = set()
        todo = [value]
        while todo:
            name = todo.pop()
            i = self.producer.get(name)
            if i is None or i in seen:
                continue
            seen.add(i)
            todo += [v for v in nodes[i].input if v and v not in stop]
        return [f"{nodes[i].op_type} {nodes[i].name}".strip() for i in sorted(seen)]


def read_graph(proto: onnx.ModelProto) -> GraphView:
    """The graph's module-output table (the file's metadata, else torch's node tags), value types
    and shapes (shape inference where the file records none), and its cut values."""
    graph = proto.graph
    producer = {v: i for i, node in enumerate(graph.node) for v in node.output if v}
    dtypes, shapes = _value_types(proto)
    meta = {p.key: p.value for p in proto.metadata_props}
    note = ""
    table: list[ModuleOutput] = []
    source = "none"
    if MODULE_OUTPUTS_KEY in meta:
        try:
            table, source = decode_table(meta[MODULE_OUTPUTS_KEY]), "table"
        except ValueError as exc:
            note = f"ignored: {exc}"
    if source == "none" and any(
        p.key == NAME_SCOPES_KEY for node in graph.node for p in node.metadata_props
    ):
        nodes = [
            NodeScope(
                tuple(node.input),
                tuple(node.output),
                parse_name_scopes(
                    next((p.value for p in node.metadata_props if p.key == NAME_SCOPES_KEY), "")
                ),
            )
            for node in graph.node
        ]
        outputs = [o.name for o in graph.output]
        table, source = (
            module_outputs(nodes, outputs, lambda v: _is_float(dtypes.get(v))),
            "name_scopes",
        )
    view = GraphView(
        proto=proto,
        table=table,
        source=source,
        producer=producer,
        dtypes=dtypes,
        shapes=shapes,
        inputs=tuple(i.name for i in graph.input),
        outputs=tuple(o.name for o in graph.output),
        initializers=frozenset(i.name for i in graph.initializer),
        note=note,
    )
    view.cuts = frozenset(cut_values(view))
    return view


def cut_values(view: GraphView) -> list[str]:
    """Float values that are, right after they are computed, the only float activation still
    needed (in the graph's node order): everything downstream depends on the inputs only through
    such a value, so when it agrees with the truth, a later error arises later."""
    nodes = view.proto.graph.node
    last_use: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for v in node.input:
            if v:
                last_use[v] = i
    end = len(nodes)
    for v in view.outputs:
        last_use[v] = end
    live = {v for v in view.inputs if _is_float(view.dtypes.get(v)) and v in last_use}
    cuts = []
    for i, node in enumerate(nodes):
        live = {v for v in live if last_use.get(v, -1) > i}
        made = [v for v in node.output if v and _is_float(view.dtypes.get(v)) and v in last_use]
        live.update(v for v in made if last_use[v] > i)
        if len(made) == 1 and live == {made[0]}:
            cuts.append(made[0])
    return cuts


def marked_copy(proto: onnx.ModelProto, values: Sequence[str], dtypes: dict[str, int]) -> bytes:
    """The model serialized with ``values`` appended to its graph outputs (those already outputs
    are left as they are); ``proto`` is given back unchanged."""
    import onnx

    outputs = proto.graph.output
    before = len(outputs)
    present = {o.name for o in outputs}
    known = {vi.name: vi for vi in proto.graph.value_info}
    try:
        for value in dict.fromkeys(values):
            if value in present:
                continue
            info = known.get(value)
            if info is None:
                elem = dtypes.get(value, onnx.TensorProto.FLOAT)
                info = onnx.helper.make_tensor_value_info(value, elem, None)
            outputs.append(info)
        return proto.SerializeToString()
    finally:
        del outputs[before:]


def _value_types(
    proto: onnx.ModelProto,
) -> tuple[dict[str, int], dict[str, tuple[int | None, ...]]]:
    """Each value's element type and dims, from the file's value_info (shape inference when the
    file records none for its node outputs)."""
    import onnx

    graph = proto.graph
    infos = [*graph.input, *graph.output, *graph.value_info]
    named = {vi.name for vi in infos}
    if any(v and v not in named for node in graph.node for v in node.output):
        try:
            inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
            infos = [*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info]
        except Exception:  # a graph shape inference cannot read keeps what the file records
            pass
    dtypes: dict[str, int] = {}
    shapes: dict[str, tuple[int | None, ...]] = {}
    for vi in infos:
        tensor = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            continue
        dtypes[vi.name] = tensor.elem_type
        if tensor.HasField("shape"):
            shapes[vi.name] = tuple(
                d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim
            )
    for init in graph.initializer:
        dtypes.setdefault(init.name, init.data_type)
    return dtypes, shapes


def _is_float(elem_type: int | None) -> bool:
    """FLOAT, DOUBLE, FLOAT16, BFLOAT16."""
    return elem_type in (1, 11, 10, 16)
