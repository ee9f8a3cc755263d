"""Checkpoints for the seed `Net`: a documented, code-free format, plus the seed's own state dicts.

Format (a plain dict, saved with `torch.save`, loaded only with `torch.load(weights_only=True)`)::

    {
        "format": "bnexport.checkpoint",
        "format_version": 1,
        "architecture": "bnexport.nets.Net",
        "config": {"temperature": 1.5, "normalize": {"mean": 0.286, "std": 0.353}},
        "state_dict": {"conv1.weight": ..., "bn1.bn.weight": ..., ...},
        "metadata": {...},   # training metrics, data, seed, versions: plain JSON-like values
    }

`normalize` applies to pixels scaled to [0, 1]: ``x = (pixel / 255 - mean) / std``.

Plain state dicts saved by the seed's code load too: its `Net` with `nn.BatchNorm2d`
(``bn1.weight``, ...) and with `myBN` (``bn1.bn.weight``, ...). They carry no temperature and no
normalization: the temperature comes from the caller (default 1.0) and the normalization defaults
to Fashion-MNIST's.
"""

from __future__ import annotations

import math
import os
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bnexport.data import FASHION_MNIST_NORMALIZE, Normalize
from bnexport.errors import CheckpointError, DataError
from bnexport.files import atomic_path, sha256_file

FORMAT = "bnexport.checkpoint"
FORMAT_VERSION = 1
ARCHITECTURE = "bnexport.nets.Net"

LAYOUT_BNEXPORT = "bnexport"
LAYOUT_SEED_BATCHNORM2D = "seed-batchnorm2d"
LAYOUT_SEED_MYBN = "seed-mybn"

_BN_STATS = ("running_mean", "running_var", "num_batches_tracked")
#: How many bytes of a refused file are read to tell what it is (an ONNX model, a pickle).
MAX_PICKLE_SCAN = 1 << 20


@dataclass
class Checkpoint:
    """A loaded checkpoint: the `Net` (eval mode) and what was recorded with it."""

    model: Any  # bnexport.nets.Net
    temperature: float
    normalize: Normalize
    metadata: dict[str, Any]
    sha256: str
    path: Path
    layout: str
    notes: list[str] = field(default_factory=list)


def save_checkpoint(
    path: str | os.PathLike[str],
    model: Any,
    *,
    normalize: Normalize,
    metadata: dict[str, Any] | None = None,
) -> str:
    """Save `model` (a `Net`) in the bnexport format, atomically. Returns the file's sha256."""
    import torch

    from bnexport.nets import Net

    if not isinstance(model, Net):
        raise CheckpointError(
            f"save_checkpoint expects a bnexport.nets.Net, got {type(model).__name__}"
        )
    temperature = _check_temperature(model.bn1.temperature, path)
    state_dict = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": ARCHITECTURE,
        "config": {"temperature": temperature, "normalize": normalize.to_dict()},
        "state_dict": state_dict,
        "metadata": dict(metadata or {}),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return sha256_file(path)


def read_torch_file(path: str | os.PathLike[str]) -> Any:
    """`torch.load(weights_only=True)` with errors a user can act on; pickled code never runs."""
    import torch

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(
            f"checkpoint {path} is a directory; give the checkpoint file (.pt) inside it"
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint is not a file: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"cannot read {path}: the file is empty (0 bytes); give the .pt file")
    try:
        with warnings.catch_warnings():
            # torch warns that a plain pickle's protocol may be unsupported; the error says more
            warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = " ".join(str(exc).split())
        _refuse_other_formats(path)
        if "unsupported global" in detail.lower():
            global_name = _unsupported_global(detail)
            raise CheckpointError(
                f"refused to load {path}: it contains pickled code or objects{global_name} that "
                "bnexport never executes; re-save it as a plain state_dict "
                "(torch.save(model.state_dict(), path))"
            ) from exc
        raise CheckpointError(
            f"cannot read {path}: corrupt checkpoint ({_unpickler_cause(detail)})"
        ) from exc
    except Exception as exc:  # zip errors, truncated files, EOF, wrong magic number
        _refuse_other_formats(path)
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise CheckpointError(
            f"cannot read {path}: not a readable torch.save file ({detail})"
        ) from exc


def _refuse_other_formats(path: Path) -> None:
    """A file torch.load(weights_only=True) refused, named for what it is: an ONNX model (the
    export, not its checkpoint), or a plain pickle, refused as code when it imports anything
    (read with `pickletools`, which never executes it)."""
    with open(path, "rb") as f:
        head = f.read(MAX_PICKLE_SCAN)
    if _is_onnx(head):
        raise CheckpointError(
            f"{path} is an ONNX model, not a checkpoint: give the .pt checkpoint it was exported "
            f"from (to check the ONNX file itself: bnexport check {path} --against CHECKPOINT)"
        )
    if not head.startswith(b"\x80"):  # a pickle's PROTO opcode; torch's zip starts with PK
        return
    imports = _pickle_imports(head)
    if imports:
        raise CheckpointError(
            f"refused to load {path}: it is a plain pickle that imports "
            f"{', '.join(imports[:3])}, code bnexport never runs; save the weights with "
            "torch.save(model.state_dict(), path)"
        )
    raise CheckpointError(
        f"cannot read {path}: a plain pickle, not a torch.save file; save the weights with "
        "torch.save(model.state_dict(), path)"
    )


#: The protobuf tags that may follow an ONNX ModelProto's ``ir_version`` (fields 2 to 8, 14).
_ONNX_NEXT_TAGS = frozenset({0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42, 0x72})


def _is_onnx(data: bytes) -> bool:
    """Whether ``data`` starts like a serialized ONNX ModelProto (even truncated): field 1, the
    IR version, a small varint, then another ModelProto field. No pickle or zip starts so."""
    if not data.startswith(b"\x08"):
        return False
    value, shift, i = 0, 0, 1
    while i < min(len(data), 11):
        byte = data[i]
        value |= (byte & 0x7F) << shift
        shift += 7
        i += 1
        if not byte & 0x80:
            break
    return 1 <= value <= 100 and i < len(data) and data[i] in _ONNX_NEXT_TAGS


def _pickle_imports(data: bytes) -> list[str]:
    """The ``module.name`` globals the first pickle in ``data`` imports (what unpickling would
    call), read op by op without running anything."""
    import pickletools

    found: list[str] = []
    strings: list[str] = []
    try:
        for op, arg, _ in pickletools.genops(data):
            if isinstance(arg, str):
                strings.append(arg)
            if op.name in ("GLOBAL", "INST"):
                found.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            elif op.name == "STOP":
                break
    except Exception:  # truncated or malformed: what was read so far
        pass
    return list(dict.fromkeys(found))


def load_checkpoint(
    path: str | os.PathLike[str], *, temperature: float | None = None
) -> Checkpoint:
    """Load a bnexport checkpoint or a seed state dict into a `Net` in eval mode.

    `temperature` is required knowledge for seed state dicts (default 1.0); for a bnexport
    checkpoint it must be omitted or equal to the recorded one.
    """
    from bnexport.nets import Net

    path = Path(path)
    obj = read_torch_file(path)
    notes: list[str] = []
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        state_dict, config, metadata = _unpack_bnexport(obj, path)
        recorded = _check_temperature(config.get("temperature", 1.0), path)
        if temperature is not None and temperature != recorded:
            raise CheckpointError(
                f"{path} records temperature {recorded}; --temperature {temperature} conflicts "
                "(it applies only to seed state dicts, which carry none)"
            )
        normalize = _normalize_from(config.get("normalize"), path)
        layout = LAYOUT_BNEXPORT
        temp = recorded
    else:
        state_dict = _as_state_dict(obj, path)
        layout, state_dict = _seed_layout(state_dict, path)
        temp = _check_temperature(1.0 if temperature is None else temperature, path)
        normalize = FASHION_MNIST_NORMALIZE
        metadata = {}
        notes.append(
            f"seed state dict ({layout}): temperature {temp} from --temperature, "
            f"normalization assumed Fashion-MNIST (mean {normalize.mean}, std {normalize.std})"
        )
    model = Net(temperature=temp)
    load_state_dict_strict(model, state_dict, path)
    model.eval()
    return Checkpoint(
        model=model,
        temperature=temp,
        normalize=normalize,
        metadata=metadata,
        sha256=sha256_file(path),
        path=path,
        layout=layout,
        notes=notes,
    )


def load_state_dict_strict(model: Any, state_dict: dict[str, Any], source: str | Path) -> None:
    """Load `state_dict` into `model`, or fail listing missing, unexpected and mis-shaped keys."""
    import torch

    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    bad_types = [
        k for k in state_dict if k in expected and not isinstance(state_dict[k], torch.Tensor)
    ]
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in state_dict
        if k in expected and k not in bad_types and state_dict[k].shape != expected[k].shape
    ]
    untracked = _untracked_bns(expected, state_dict)
    if untracked:
        raise CheckpointError(
            f"{source}: BatchNorm {', '.join(untracked)} has no running statistics "
            "(saved with track_running_stats=False): in eval mode it normalizes with batch "
            "statistics and cannot be folded; retrain with track_running_stats=True"
        )
    if missing or unexpected or mismatched or bad_types:
        parts = []
        if missing:
            parts.append(f"missing keys: {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(unexpected)}")
        if mismatched:
            parts.append(f"mismatched shapes: {'; '.join(mismatched)}")
        if bad_types:
            parts.append(f"not tensors: {', '.join(bad_types)}")
        raise CheckpointError(
            f"{source} does not match {type(model).__name__}: " + " | ".join(parts)
        )
    model.load_state_dict(state_dict, strict=True)


def _unpack_bnexport(obj: dict[str, Any], path: Path) -> tuple[dict, dict, dict]:
    version = obj.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version!r} is not supported "
            f"(this bnexport reads version {FORMAT_VERSION}); upgrade bnexport"
        )
    if obj.get("architecture") != ARCHITECTURE:
        raise CheckpointError(
            f"{path}: architecture {obj.get('architecture')!r} is not {ARCHITECTURE!r}; "
            "for other models use --model package.module:factory"
        )
    state_dict, config = obj.get("state_dict"), obj.get("config")
    if not isinstance(state_dict, dict) or not isinstance(config, dict):
        raise CheckpointError(f"{path}: corrupt checkpoint (no state_dict or config)")
    metadata = obj.get("metadata") or {}
    return state_dict, config, metadata if isinstance(metadata, dict) else {}


def _as_state_dict(obj: Any, path: Path) -> dict[str, Any]:
    """A plain state dict, or one wrapped under ``state_dict`` / ``model_state_dict``."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), dict):
                return obj[key]
        if obj and all(isinstance(k, str) for k in obj):
            return obj
    raise CheckpointError(
        f"{path}: not a bnexport checkpoint or a state dict (got {type(obj).__name__})"
    )


def _seed_layout(state_dict: dict[str, Any], path: Path) -> tuple[str, dict[str, Any]]:
    """Map the seed's `nn.BatchNorm2d` keys (``bn1.weight``) onto `TemperatureBatchNorm2d`'s."""
    if any(k.startswith("bn1.bn.") for k in state_dict):
        return LAYOUT_SEED_MYBN, state_dict
    if any(k.startswith("bn1.") for k in state_dict):
        mapped = {
            (f"bn1.bn.{k[len('bn1.') :]}" if k.startswith("bn1.") else k): v
            for k, v in state_dict.items()
        }
        return LAYOUT_SEED_BATCHNORM2D, mapped
    return LAYOUT_SEED_MYBN, state_dict  # let the strict loader list what is missing


def _untracked_bns(expected: dict[str, Any], state_dict: dict[str, Any]) -> list[str]:
    """BN prefixes whose affine params are present but whose running statistics all are absent."""
    prefixes = {k[: -len("running_mean")] for k in expected if k.endswith("running_mean")}
    return [
        p.rstrip(".")
        for p in sorted(prefixes)
        if all(p + s not in state_dict for s in _BN_STATS)
        and any(k.startswith(p) for k in state_dict)
    ]


def _check_temperature(value: Any, path: Any) -> float:
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise CheckpointError(f"{path}: temperature must be a number, got {value!r}") from None
    if not math.isfinite(t):
        raise CheckpointError(f"{path}: temperature must be a finite number, got {t}")
    return t


def _normalize_from(value: Any, path: Path) -> Normalize:
    if value is None:
        return FASHION_MNIST_NORMALIZE
    try:
        return Normalize.from_dict(value)
    except (TypeError, ValueError, KeyError, DataError) as exc:
        raise CheckpointError(f"{path}: bad normalize config {value!r}: {exc}") from None


def _unpickler_cause(detail: str) -> str:
    """The cause in torch's weights-only error, without its advice to load with
    ``weights_only=False`` (which would run the file's pickled code)."""
    marker = "WeightsUnpickler error:"
    if marker not in detail:
        return detail
    cause = detail.split(marker, 1)[1].split("Check the documentation of torch.load", 1)[0]
    return cause.strip() or "unreadable pickle"


def _unsupported_global(detail: str) -> str:
    marker = "Unsupported global: GLOBAL "
    if marker in detail:
        name = detail.split(marker, 1)[1].split()[0].rstrip(".,")
        return f" ({name})"
    return ""
