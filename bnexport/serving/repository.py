"""The model repository: one folder per model that Triton and MLServer both load unchanged.

Layout (Triton's)::

    DIR/NAME/config.pbtxt            Triton, CPU instances (the default config)
    DIR/NAME/configs/gpu.pbtxt       Triton, GPU instances (tritonserver --model-config-name=gpu)
    DIR/NAME/model-settings.json     MLServer, naming bnexport's runtime class
    DIR/NAME/VERSION/model.onnx      the file, its external data beside it

`read_repository` finds the models of a repository for `bnexport serve`, checking each one's
``config.pbtxt`` and ``model-settings.json`` before anything listens.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bnexport.serving.errors import RepositoryError

CONFIG_FILE = "config.pbtxt"
GPU_CONFIG_FILE = "configs/gpu.pbtxt"
SETTINGS_FILE = "model-settings.json"
MODEL_FILE = "model.onnx"
#: The MLServer runtime class ``model-settings.json`` names.
RUNTIME_CLASS = "bnexport.serving.runtime.OnnxModel"
#: Model names Triton, MLServer and a URL path all take as they are.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


@dataclass(frozen=True)
class ModelEntry:
    """One model of a repository: its name, folder, version and the file it serves."""

    name: str
    folder: Path
    version: str
    model_file: Path
    settings: dict[str, Any]

    @property
    def max_batch_size(self) -> int:
        return int(self.settings.get("max_batch_size", 0))


def open_model_session(path: Path) -> Any:
    """The session a served file runs in: bnexport's one session factory, with every setting the
    file carries from `bnexport tune` applied."""
    from bnexport.ort import SessionConfig, make_session

    return make_session(path, SessionConfig(), file_settings="apply")


def check_name(name: str) -> str:
    """``name`` if Triton, MLServer and a URL all take it; else `RepositoryError`."""
    if not NAME_PATTERN.fullmatch(name) or name in (".", ".."):
        raise RepositoryError(
            f"model name {name!r}: use letters, digits, '_', '.' and '-' (not first), at most "
            "128 characters; pass --name"
        )
    return name


def name_from_path(path: Path) -> str:
    """A model name from a file name: its stem with other characters turned into '_'."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", path.stem).lstrip(".-") or "model"
    return name[:128]


def read_settings(folder: Path) -> dict[str, Any]:
    """A model folder's ``model-settings.json`` (`RepositoryError` when missing or not JSON)."""
    path = folder / SETTINGS_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise RepositoryError(f"{folder} has no {SETTINGS_FILE}; run bnexport package") from None
    except (OSError, ValueError) as exc:
        raise RepositoryError(f"{path}: not a JSON file ({exc})") from None
    if not isinstance(data, dict):
        raise RepositoryError(f"{path}: not a JSON object")
    return data


def read_repository(root: str | os.PathLike[str]) -> list[ModelEntry]:
    """The models of the repository at ``root``, each checked (`RepositoryError` otherwise)."""
    root = Path(root)
    if not root.is_dir():
        raise RepositoryError(f"model repository {root} is not a folder; run bnexport package")
    folders = sorted(p.parent for p in root.glob(f"*/{SETTINGS_FILE}"))
    if not folders:
        raise RepositoryError(
            f"model repository {root} holds no model (no */{SETTINGS_FILE}); run bnexport package "
            f"MODEL.onnx --repository {root}"
        )
    return [read_model(folder) for folder in folders]


def read_model(folder: Path) -> ModelEntry:
    """One model folder: its settings name bnexport's runtime and a file that exists."""
    settings = read_settings(folder)
    name = settings.get("name") or folder.name
    if name != folder.name:
        raise RepositoryError(f"{folder / SETTINGS_FILE}: name {name!r} differs from its folder")
    implementation = settings.get("implementation")
    if implementation != RUNTIME_CLASS:
        raise RepositoryError(
            f"{folder / SETTINGS_FILE}: implementation {implementation!r} is not bnexport's "
            f"runtime {RUNTIME_CLASS}; serve it with mlserver start, or repackage it"
        )
    parameters = settings.get("parameters") or {}
    version = str(parameters.get("version") or "")
    model_file = folder / version / MODEL_FILE
    if not version or not model_file.is_file():
        raise RepositoryError(
            f"{folder}: version {version!r} has no {MODEL_FILE} ({model_file} missing)"
        )
    return ModelEntry(name, folder, version, model_file, settings)
