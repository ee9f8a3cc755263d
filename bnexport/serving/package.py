"""`bnexport package`: write one model folder that Triton and MLServer both load unchanged.

Everything is built and validated in memory first (Triton's schema and load-time checks,
`bnexport.serving.triton_config`), then written to a temporary folder beside the target and
renamed into place: a failed run leaves no half-written model, and an existing model folder is
replaced only with ``force``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bnexport.serving.defaults import (
    DEFAULT_INSTANCES,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_QUEUE_DELAY_US,
    DEFAULT_VERSION,
)
from bnexport.serving.errors import RepositoryError
from bnexport.serving.graph_io import GraphIO, read_graph_io
from bnexport.serving.repository import (
    CONFIG_FILE,
    GPU_CONFIG_FILE,
    MODEL_FILE,
    RUNTIME_CLASS,
    SETTINGS_FILE,
    check_name,
    name_from_path,
)
from bnexport.serving.triton_config import (
    PLATFORM,
    Batching,
    TritonSpec,
    build_config,
    config_text,
    parse_config,
    validate_config,
)


@dataclass(frozen=True)
class PackageConfig:
    """What `package_model` writes: where, under which name and version, how it batches."""

    model: Path
    repository: Path
    name: str | None = None
    version: int = DEFAULT_VERSION
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    instances: int = DEFAULT_INSTANCES
    queue_delay_us: int = DEFAULT_QUEUE_DELAY_US
    force: bool = False

    def __post_init__(self) -> None:
        if self.version < 1:
            raise RepositoryError(f"--version {self.version}: Triton's versions start at 1")
        if self.max_batch_size < 0:
            raise RepositoryError(f"--max-batch-size {self.max_batch_size} must be >= 0")
        if self.instances < 1:
            raise RepositoryError(f"--instances {self.instances} must be >= 1")
        if self.queue_delay_us < 0:
            raise RepositoryError(f"queue delay {self.queue_delay_us} µs must be >= 0")


@dataclass
class PackageResult:
    """What was written, and what the user should know about it."""

    name: str
    folder: Path
    files: list[Path]
    io: GraphIO
    max_batch_size: int
    settings: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    replaced: bool = False

    def settings_label(self) -> str:
        """The tuned settings in one line (``threads=1, prepacking=off``; ``defaults``)."""
        from bnexport.ort_config import OrtSettings

        return OrtSettings(**self.settings).label()

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "folder": str(self.folder),
            "files": [str(p) for p in self.files],
            "io": self.io.to_dict(),
            "max_batch_size": self.max_batch_size,
            "tuned_settings": self.settings,
            "notes": list(self.notes),
            "replaced": self.replaced,
        }


def package_model(config: PackageConfig) -> PackageResult:
    """Write ``config.repository/NAME`` for ``config.model`` (`RepositoryError` on refusal)."""
    from bnexport.onnx_file import check_onnx_model, external_data_files

    model = check_onnx_model(config.model)  # the front door every command uses
    data_files = external_data_files(config.model)
    name = check_name(config.name or name_from_path(Path(config.model)))
    target = Path(config.repository) / name
    _check_target(target, config)
    io = read_graph_io(model, str(config.model))
    notes: list[str] = []
    batching = _batching(io, config, notes)
    settings = tuned_settings(config.model)
    texts: dict[str, str] = {}
    for relative, gpu in ((CONFIG_FILE, False), (GPU_CONFIG_FILE, True)):
        spec = TritonSpec(name, io, batching, config.instances, gpu, settings)
        message, left_out = build_config(spec)
        text = config_text(message)
        validate_config(parse_config(text, relative), name, io, f"{name}/{relative}")
        texts[relative] = text
    if not message.model_warmup:
        notes.append("no model_warmup: an input has a symbolic dimension besides the batch one")
    if left_out:
        notes.append(
            f"Triton's onnxruntime backend has no parameter for {', '.join(left_out)}: "
            "bnexport serve applies it; under Triton the model runs without it"
        )
    texts[SETTINGS_FILE] = _settings_json(name, io, batching, config.version)
    replaced = target.exists()
    files = _write(target, texts, Path(config.model), data_files, config)
    return PackageResult(
        name, target, files, io, batching.max_batch_size, settings, notes, replaced
    )


def tuned_settings(path: Path) -> dict[str, Any]:
    """The onnxruntime settings the file carries from `bnexport tune`: its ``ort_config`` keys
    and ``session_config_entries`` ({} when untuned)."""
    from bnexport.ort_config import model_settings

    settings = model_settings(path)
    return {} if settings is None else settings.to_dict()


def _check_target(target: Path, config: PackageConfig) -> None:
    if target.exists() and not config.force:
        raise RepositoryError(
            f"model folder {target} exists; pass --force to replace it, or --name another"
        )
    if target.exists() and not target.is_dir():
        raise RepositoryError(f"{target} exists and is not a folder")
    repo = Path(config.repository)
    if repo.exists() and not repo.is_dir():
        raise RepositoryError(f"--repository {repo} is a file, not a folder")
    if Path(config.model).resolve().is_relative_to(target.resolve()):
        raise RepositoryError(f"{config.model} is inside the model folder it would replace")


def _batching(io: GraphIO, config: PackageConfig, notes: list[str]) -> Batching:
    """Batching for the graph: off when any tensor's first dimension is fixed (with a note)."""
    fixed = io.fixed_first_dimension()
    if config.max_batch_size == 0:
        return Batching(0)
    if fixed:
        notes.append(
            "max_batch_size 0 (no batching): the graph fixes the first dimension of "
            + ", ".join(t.describe() for t in fixed)
            + "; export it with a dynamic batch dimension to let the server batch"
        )
        return Batching(0)
    size = config.max_batch_size
    return Batching(size, (size,), config.queue_delay_us)


def _settings_json(name: str, io: GraphIO, batching: Batching, version: int) -> str:
    """MLServer's ``model-settings.json``: bnexport's runtime, the I/O and the same batching."""
    from bnexport.files import json_text

    data: dict[str, Any] = {
        "name": name,
        "implementation": RUNTIME_CLASS,
        "platform": PLATFORM,
        "inputs": [t.to_dict() for t in io.inputs],
        "outputs": [t.to_dict() for t in io.outputs],
        "parameters": {"version": str(version)},
    }
    if batching.max_batch_size > 0:
        data["max_batch_size"] = batching.max_batch_size
        data["max_batch_time"] = batching.queue_delay_us / 1e6
    return json_text(data)


def _write(
    target: Path,
    texts: dict[str, str],
    model: Path,
    data_files: tuple[Path, ...],
    config: PackageConfig,
) -> list[Path]:
    """Build the folder under a temporary name beside ``target``, then swap it in."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        version_dir = staging / str(config.version)
        version_dir.mkdir()
        shutil.copyfile(model, version_dir / MODEL_FILE)
        folder = model.resolve().parent
        for data in data_files:  # kept at the same relative location beside model.onnx
            dest = version_dir / data.relative_to(folder)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(data, dest)
        for relative, text in texts.items():
            path = staging / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        _swap(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return sorted(p for p in target.rglob("*") if p.is_file())


def _swap(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``; an old ``target`` is moved aside first, then removed."""
    mode = 0o777 & ~_umask()
    for path in [staging, *staging.rglob("*")]:
        path.chmod(mode if path.is_dir() else mode & 0o666)
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        os.replace(target, old / target.name)
    try:
        os.replace(staging, target)
    except OSError:
        if old is not None:
            os.replace(old / target.name, target)
        raise
    finally:
        if old is not None:
            with contextlib.suppress(OSError):
                shutil.rmtree(old)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
