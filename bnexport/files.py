"""File helpers: output paths checked before the work, atomic writes (a failed run leaves no
half-written artifact; a set of files is written all or nothing) and hashing."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bnexport.errors import OutputPathError


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path beside `path`; it replaces `path` only if the block succeeds."""
    with atomic_paths([path]) as (tmp,):
        yield tmp


@contextmanager
def atomic_paths(paths: Sequence[str | os.PathLike[str]]) -> Iterator[list[Path]]:
    """Yield a temp path beside each of `paths`; all of them replace their targets only if the
    block succeeds (a set of files written all or nothing).

    On a failure (Ctrl-C included) before the renames, the temps and the folders made for them
    are removed and no target changes. An OSError of creating, filling or renaming a temp is an
    `OutputPathError` naming the target. The renames come last, one system call each; they cannot
    fail for targets `check_output_paths` accepted, short of a race.
    """
    targets = [Path(p) for p in paths]
    temps: list[Path] = []
    made: list[Path] = []
    done = False
    try:
        for target in targets:
            with _naming(target):
                made += _make_parents(target.parent)
                fd, tmp = tempfile.mkstemp(
                    prefix=f".{target.name}.", suffix=".tmp", dir=target.parent
                )
                os.close(fd)
            temps.append(Path(tmp))
        try:
            yield temps
        except OSError as exc:
            named = {str(t): target for t, target in zip(temps, targets, strict=True)}
            if exc.filename is None or str(exc.filename) not in named:
                raise
            raise _cannot_write(named[str(exc.filename)], exc) from exc
        mode = 0o666 & ~_umask()  # mkstemp makes 0600; give the usual file mode
        for tmp, target in zip(temps, targets, strict=True):
            with _naming(target):
                os.chmod(tmp, mode)
                os.replace(tmp, target)
        done = True
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        if not done:  # drop the folders made for the failed set (those still empty)
            for folder in reversed(made):
                with contextlib.suppress(OSError):
                    folder.rmdir()


def write_files(writers: Mapping[str | os.PathLike[str], Callable[[Path], object]]) -> None:
    """Write a set of files all or nothing: each writer fills the temp path it is given, then all
    are renamed into place (`atomic_paths`). An OSError → `OutputPathError` naming the target."""
    targets = [Path(p) for p in writers]
    with atomic_paths(targets) as temps:
        for target, tmp, write in zip(targets, temps, writers.values(), strict=True):
            with _naming(target):
                write(tmp)


def check_output_paths(
    outputs: Mapping[str, str | os.PathLike[str] | None],
    inputs: Iterable[str | os.PathLike[str] | None] = (),
) -> None:
    """Refuse, before any work, an output that would destroy an input or cannot be written.

    `outputs` maps each option (``-o``, ``--json``) to its path (None: not asked for). Each
    output must not be an input (same file, symlink or hard link), nor another output, nor a
    directory or other non-regular file, and its folder must be creatable and take new files.
    Raises `OutputPathError` naming the option, the path and the fix.
    """
    given = {flag: Path(p) for flag, p in outputs.items() if p is not None}
    existing_inputs = [Path(p) for p in inputs if p is not None and _exists(Path(p))]
    seen: dict[Path, str] = {}
    for flag, path in given.items():
        try:
            _check_output(flag, path, existing_inputs, seen)
        except OSError as exc:  # a name too long, a folder that cannot be listed, …
            raise OutputPathError(
                f"{flag} {path}: {exc.strerror or exc}; choose another path"
                + (" (at most 255 bytes per name)" if exc.errno == errno.ENAMETOOLONG else "")
            ) from None


def _check_output(flag: str, path: Path, inputs: list[Path], seen: dict[Path, str]) -> None:
    """One output of `check_output_paths` (``seen``: the outputs checked so far)."""
    _check_kind(flag, path)
    for source in inputs:
        if _same_file(path, source):
            raise OutputPathError(
                f"{flag} {path} is the input {source}: writing it would destroy the input; "
                "choose another output path"
            )
    key = path.resolve()
    if key in seen:
        raise OutputPathError(f"{seen[key]} and {flag} both write {path}; give each its own file")
    seen[key] = flag
    _check_writable(path)


def _check_kind(flag: str, path: Path) -> None:
    if path.is_dir():
        raise OutputPathError(f"{flag} {path} is a directory; give a path to a file")
    if path.exists() and not path.is_file():
        raise OutputPathError(
            f"{flag} {path} is not a regular file; bnexport replaces what it writes, so give a "
            "path to a regular file"
        )


def _exists(path: Path) -> bool:
    """``path.exists()``, False for a path the system cannot even look up (a name too long)."""
    try:
        return path.exists()
    except OSError:
        return False


def _same_file(a: Path, b: Path) -> bool:
    """Same file on disk (through symlinks and hard links); False when `a` does not exist."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _check_writable(path: Path) -> None:
    """The nearest existing folder above `path` is a folder that takes a new file (probed)."""
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise OutputPathError(f"cannot write {path}: {folder} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".bnexport-probe-", dir=folder)
    except OSError as exc:
        raise OutputPathError(
            f"cannot write {path}: {folder} takes no new files ({exc.strerror or exc}); choose "
            "another folder"
        ) from None
    os.close(fd)
    os.unlink(probe)


def _make_parents(folder: Path) -> list[Path]:
    """Create `folder` and its missing parents; return the ones made, outermost first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    missing.reverse()
    for m in missing:
        m.mkdir()
    return missing


@contextmanager
def _naming(target: Path) -> Iterator[None]:
    """Turn an OSError into an `OutputPathError` naming `target`."""
    try:
        yield
    except OSError as exc:
        raise _cannot_write(target, exc) from exc


def _cannot_write(target: Path, exc: OSError) -> OutputPathError:
    return OutputPathError(f"cannot write {target}: {exc.strerror or exc}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def failed_path(path: str | os.PathLike[str]) -> Path:
    """Where a file whose parity check failed is kept on request (``--keep-failed``): beside
    ``path``, ``.failed`` before its suffix (``net.onnx`` → ``net.failed.onnx``), so that nothing
    that reads ``path`` picks it up."""
    path = Path(path)
    return path.with_name(f"{path.stem}.failed{path.suffix}")


def discard(path: str | os.PathLike[str]) -> None:
    """Remove the file at ``path`` if there is one (a failed run leaves nothing at its output);
    an OSError is an `OutputPathError` naming it."""
    with _naming(Path(path)):
        Path(path).unlink(missing_ok=True)


def settle_failed(path: str | os.PathLike[str], keep: bool) -> Path | None:
    """After a failed parity check: the file at ``path`` moved to `failed_path` (``keep``) or
    removed, so nothing is left at ``path``. Returns where it was kept (None: removed)."""
    path = Path(path)
    if not keep:
        discard(path)
        return None
    target = failed_path(path)
    with _naming(target):
        os.replace(path, target)
    return target


def json_text(data: Any) -> str:
    """`data` as bnexport writes JSON: indented, non-JSON values as strings, a final newline."""
    return json.dumps(data, indent=2, default=str) + "\n"


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write `data` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json_text(data))


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
