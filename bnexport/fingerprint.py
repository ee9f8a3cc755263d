"""The weights fingerprint: which weights an ONNX file was exported from.

``weights_sha256(model)`` is the sha256 of the model's ``state_dict()``: for each tensor entry,
in sorted name order, the UTF-8 bytes of ``f"{name}\\0{dtype}\\0{shape}\\0"`` (dtype as torch
spells it, e.g. ``torch.float32``; shape as comma-separated sizes, empty for a scalar), then the
tensor's raw bytes (dense, contiguous, on the CPU, native byte order). Non-tensor entries (extra
state) are left out. `bnexport onnx` records it in the ONNX metadata as ``weights_sha256`` (of
the unfolded model); `bnexport check` recomputes it for its reference and refuses a mismatch, so
an unseeded factory can't silently be compared with another random model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import Any

from bnexport.errors import WeightsMismatchError

METADATA_KEY = "weights_sha256"
SOURCE_KEY = "source_name"  # the metadata key naming what `bnexport onnx` exported
SHORT = 12  # hex digits shown in messages


def weights_sha256(model: Any) -> str:
    """The sha256 (hex) of `model.state_dict()`'s tensors, as the module docstring defines it."""
    import torch

    digest = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        tensor = state[name]
        if not isinstance(tensor, torch.Tensor):
            continue
        t = tensor.detach().cpu()
        if t.layout != torch.strided:
            t = t.to_dense()
        shape = ",".join(str(d) for d in t.shape)
        digest.update(f"{name}\0{t.dtype}\0{shape}\0".encode())
        digest.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def verify_weights(
    metadata: Mapping[str, str],
    reference: Any,
    *,
    rebuild: Callable[[], Any] | None = None,
    name: str = "",
) -> tuple[str, list[str]]:
    """Check `reference` against the fingerprint in an ONNX model's `metadata`.

    Returns the reference's fingerprint and notes for the report (no fingerprint recorded: not
    checked). `rebuild` builds the reference again (a ``--model`` factory): on a mismatch, a
    factory whose two calls differ is named as unseeded. Raises `WeightsMismatchError`.
    """
    digest = weights_sha256(reference)
    recorded = metadata.get(METADATA_KEY)
    again = weights_sha256(rebuild()) if rebuild is not None and recorded != digest else None
    unstable = again is not None and again != digest
    factory = f"the factory {name}" if name else "the factory"
    if recorded is None:
        notes = [
            f"the ONNX model records no {METADATA_KEY} (not exported by bnexport onnx): the "
            "reference's weights were not checked against the exported ones"
        ]
        if unstable:
            notes.append(
                f"{factory} returns different weights on each call: seed it, or the reference may "
                "not be the exported model"
            )
        return digest, notes
    if recorded == digest:
        return digest, []
    head = (
        f"this ONNX was exported from weights {recorded[:SHORT]}, the reference has "
        f"{digest[:SHORT]}"
    )
    if unstable:
        raise WeightsMismatchError(
            f"{head}; {factory} returns different weights on each call "
            f"({digest[:SHORT]}, then {again[:SHORT]}): seed it"  # type: ignore[index]
        )
    source = metadata.get(SOURCE_KEY)
    mine = f" ({name})" if name else ""
    if source and source != name:
        raise WeightsMismatchError(
            f"{head}: the file records it was exported from {source}, the reference is another "
            f"model{mine}; check it against {source}"
        )
    if source:  # the same source, other weights: a changed checkpoint, or the factory's seed
        raise WeightsMismatchError(
            f"{head}: the file was exported from {source} too, whose weights have changed since "
            "(another seed or checkpoint); export it again or check against those weights"
        )
    if again is not None:
        raise WeightsMismatchError(
            f"{head}; {factory} returns the same weights on each call, so the file comes from "
            "other weights (another model, seed or checkpoint)"
        )
    raise WeightsMismatchError(f"{head}: the file comes from another model or checkpoint")
