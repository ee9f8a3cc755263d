"""Save a (folded) model as a self-contained `torch.export` program (.pt2)."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnexport.errors import ExportError
from bnexport.export import exporter
from bnexport.files import atomic_path, sha256_file

if TYPE_CHECKING:
    import torch


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

    inputs = exporter.example_batches(example_inputs)
    with exporter.quiet_exporter() as log, exporter.eval_mode(model), torch.inference_mode(False):
        try:
            program = torch.export.export(
                model, inputs, dynamic_shapes=exporter.dynamic_batch_shapes(inputs)
            )
        except Exception as exc:
            raise exporter.export_failure("torch.export", exc, log.getvalue()) from exc
        _check_program_batch(program)
        for node in program.graph.nodes:  # stack traces name local files: not reproducible
            node.meta.pop("stack_trace", None)
        # Saving through a file object names the archive folder "archive", not the temp file.
        with exporter.writable(path), atomic_path(path) as tmp, open(tmp, "wb") as fh:
            try:
                torch.export.save(program, fh)
            except Exception as exc:
                raise exporter.export_failure("torch.export.save", exc, log.getvalue()) from exc
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
