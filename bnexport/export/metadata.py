"""What an exported ONNX file records about its model in ``metadata_props``."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from bnexport import __version__
from bnexport.errors import ExportError


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


def metadata_props(metadata: Mapping[str, Any] | None, torch_version: str) -> dict[str, str]:
    """Caller's metadata as strings (JSON for non-strings), sorted, with the tool versions."""
    props: dict[str, str] = {"bnexport_version": __version__, "torch_version": torch_version}
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not key:
            raise ExportError(f"metadata keys must be non-empty strings, got {key!r}")
        if value is None:
            continue
        props[key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return dict(sorted(props.items()))
