"""Which ONNX value is which PyTorch module's output: the module-output table of an exported graph.

torch's dynamo exporter tags every node with the modules it was traced in
(``pkg.torch.onnx.name_scopes``: the module paths from the root inwards, then the node's own
name). A module *call* is a connected group of nodes that share its path; its **output** is the
one data value that group produces and hands on (to a node outside the group, or as a graph
output). A group with no such value, or several (a module returning a tuple), has no output
here: nothing is guessed.

bnexport's export strips node metadata (the file must be byte-identical on every machine), so
:func:`module_outputs` runs on the graph just before that and the table is written to the
file's ``metadata_props`` under `MODULE_OUTPUTS_KEY` (:func:`encode_table`): module paths and
value names only, both fixed by the model. A file torch wrote keeps the node tags, and the same
function reads them (:func:`parse_name_scopes`). `bnexport check --localize` reads either.

A leaf: the standard library only (callers adapt their graph to `NodeScope`).
"""

from __future__ import annotations

import ast
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

#: The ``metadata_props`` key of the module-output table in a file bnexport wrote.
MODULE_OUTPUTS_KEY = "module_outputs"
#: The node metadata key torch's dynamo exporter writes the module paths under.
NAME_SCOPES_KEY = "pkg.torch.onnx.name_scopes"
TABLE_FORMAT = 1
#: Scope entries the exporter invents for nodes outside any module (not module paths).
_PSEUDO_SCOPE_PREFIX = "_empty_nn_module_stack"


@dataclass(frozen=True)
class ModuleOutput:
    """The ONNX ``value`` that the ``call``-th call (0-based) of ``module`` returns."""

    module: str
    call: int
    value: str


@dataclass(frozen=True)
class NodeScope:
    """One node of a graph, in topological order: its input and output value names and the
    module paths it was traced in, outermost first (the root and the node's own name left out)."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    scopes: tuple[str, ...]


def parse_name_scopes(text: str | None) -> tuple[str, ...]:
    """The module paths of one node's ``pkg.torch.onnx.name_scopes`` entry (``repr`` of a list:
    ``['', 'layer1', 'layer1.0', 'layer1.0.conv1', 'conv2d_1']``): the root (``''``), the
    node's own name (the last entry) and the exporter's placeholders dropped; ``()`` when absent
    or unreadable."""
    if not text:
        return ()
    try:
        entries = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return ()
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        return ()
    return tuple(e for e in entries[:-1] if e and not e.startswith(_PSEUDO_SCOPE_PREFIX))


def module_outputs(
    nodes: Sequence[NodeScope],
    graph_outputs: Iterable[str],
    is_data: Callable[[str], bool] = lambda _: True,
) -> list[ModuleOutput]:
    """Each module call's output value (module docstring), in the order the calls' first nodes
    appear. ``is_data`` says which values are data (float tensors): groups that produce no data
    (shape arithmetic) are not calls, and only data values can be a call's output."""
    outputs = set(graph_outputs)
    consumers: dict[str, set[int]] = {}
    producer: dict[str, int] = {}
    members: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for name in node.inputs:
            if name:
                consumers.setdefault(name, set()).add(i)
        for name in node.outputs:
            producer[name] = i
        for path in node.scopes:
            members.setdefault(path, []).append(i)
    rows: list[tuple[int, ModuleOutput]] = []
    for path, indices in members.items():
        call = 0
        for group in _groups(nodes, indices, producer):
            produced = [v for i in group for v in nodes[i].outputs if v and is_data(v)]
            if not produced:
                continue
            escaping = [v for v in produced if v in outputs or not consumers.get(v, set()) <= group]
            if len(escaping) == 1:
                rows.append((min(group), ModuleOutput(path, call, escaping[0])))
            call += 1
    return [row for _, row in sorted(rows, key=lambda r: (r[0], r[1].module.count(".")))]


def _groups(
    nodes: Sequence[NodeScope], indices: list[int], producer: dict[str, int]
) -> list[set[int]]:
    """The connected groups of ``indices`` (joined where a node in the set consumes another's
    output), ordered by their first node."""
    parent = {i: i for i in indices}

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in indices:
        for name in nodes[i].inputs:
            j = producer.get(name)
            if j is not None and j in parent:
                parent[find(i)] = find(j)
    groups: dict[int, set[int]] = {}
    for i in indices:
        groups.setdefault(find(i), set()).add(i)
    return sorted(groups.values(), key=min)


def encode_table(rows: Sequence[ModuleOutput]) -> str:
    """The table as compact JSON: ``{"format": 1, "outputs": [[module, call, value], …]}``."""
    data = {"format": TABLE_FORMAT, "outputs": [[r.module, r.call, r.value] for r in rows]}
    return json.dumps(data, separators=(",", ":"))


def decode_table(text: str) -> list[ModuleOutput]:
    """The rows of an `encode_table` string; ``ValueError`` for anything else."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{MODULE_OUTPUTS_KEY} is not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT:
        raise ValueError(f"{MODULE_OUTPUTS_KEY}: unknown format {str(data)[:60]!r}")
    rows = []
    for row in data.get("outputs", []):
        if (
            not isinstance(row, list)
            or len(row) != 3
            or not isinstance(row[0], str)
            or not isinstance(row[1], int)
            or not isinstance(row[2], str)
        ):
            raise ValueError(f"{MODULE_OUTPUTS_KEY}: bad row {row!r}")
        rows.append(ModuleOutput(row[0], row[1], row[2]))
    return rows
