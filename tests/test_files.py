"""`bnexport.files`: output paths refused before any work; sets of files written all or nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bnexport.errors import OutputPathError
from bnexport.files import atomic_path, check_output_paths, write_files

UNWRITABLE = Path("/proc/bnexport-test/x.json")  # /proc takes no new files, not even root's


def _input(tmp_path: Path) -> Path:
    path = tmp_path / "net.pt"
    path.write_bytes(b"the user's checkpoint")
    return path


@pytest.mark.parametrize("alias", ["same", "symlink", "hardlink", "dotted"])
def test_an_output_that_is_an_input_is_refused_naming_both(alias: str, tmp_path: Path) -> None:
    source = _input(tmp_path)
    out = {
        "same": source,
        "symlink": tmp_path / "link.pt",
        "hardlink": tmp_path / "hard.pt",
        "dotted": tmp_path / "sub" / ".." / "net.pt",
    }[alias]
    (tmp_path / "sub").mkdir()
    if alias == "symlink":
        out.symlink_to(source)
    elif alias == "hardlink":
        os.link(source, out)
    with pytest.raises(OutputPathError, match="is the input") as info:
        check_output_paths({"-o": out}, [source])
    assert str(out) in str(info.value) and str(source) in str(info.value)
    assert source.read_bytes() == b"the user's checkpoint"


def test_an_input_given_through_a_symlink_is_still_protected(tmp_path: Path) -> None:
    source = _input(tmp_path)
    link = tmp_path / "link.pt"
    link.symlink_to(source)
    with pytest.raises(OutputPathError, match="is the input"):
        check_output_paths({"--json": source}, [None, link])


def test_two_outputs_on_one_path_are_refused(tmp_path: Path) -> None:
    with pytest.raises(OutputPathError, match="-o and --report-json both write"):
        check_output_paths({"-o": tmp_path / "a", "--report-json": tmp_path / "x" / ".." / "a"})


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda t: t, "is a directory"),
        (lambda t: Path("/dev/null"), "is not a regular file"),
        (lambda t: UNWRITABLE, "takes no new files"),
        (lambda t: t / "file" / "x.json", "is not a directory"),
    ],
)
def test_unwritable_outputs_are_refused_up_front(make, needle: str, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputPathError, match=needle):
        check_output_paths({"--json": make(tmp_path)})


def test_a_new_path_in_new_folders_is_accepted_and_nothing_is_created(tmp_path: Path) -> None:
    check_output_paths({"-o": tmp_path / "a" / "b" / "net.onnx", "--json": None}, [None])
    assert list(tmp_path.iterdir()) == []


def test_a_set_with_one_unwritable_file_writes_none_and_changes_none(tmp_path: Path) -> None:
    old = tmp_path / "r.json"
    old.write_text("old report")
    with pytest.raises(OutputPathError, match=f"cannot write {UNWRITABLE}"):
        write_files(
            {
                old: lambda tmp: tmp.write_text("new report"),
                tmp_path / "new" / "r.xml": lambda tmp: tmp.write_text("<xml/>"),
                UNWRITABLE: lambda tmp: tmp.write_text("# md"),
            }
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
    assert old.read_text() == "old report"


def test_a_writer_failing_midway_leaves_no_file_of_the_set(tmp_path: Path) -> None:
    def broken(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError(28, "No space left on device", str(tmp))

    with pytest.raises(OutputPathError, match=r"cannot write .*r\.xml: No space left on device"):
        write_files({tmp_path / "r.json": lambda t: t.write_text("{}"), tmp_path / "r.xml": broken})
    assert list(tmp_path.iterdir()) == []


def test_a_complete_set_is_written_with_the_usual_mode(tmp_path: Path) -> None:
    paths = [tmp_path / "r.json", tmp_path / "deep" / "r.md"]
    write_files({p: (lambda tmp, p=p: tmp.write_text(p.name)) for p in paths})
    assert [p.read_text() for p in paths] == ["r.json", "r.md"]
    mask = os.umask(0)
    os.umask(mask)
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~mask for p in paths)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["deep", "r.json", "r.md"]


def test_atomic_path_names_the_target_of_a_failed_write(tmp_path: Path) -> None:
    target = tmp_path / "net.pt"
    needle = f"cannot write {target}: Disk quota exceeded"
    with pytest.raises(OutputPathError, match=needle), atomic_path(target) as tmp:
        raise OSError(122, "Disk quota exceeded", str(tmp))
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_while_writing_leaves_neither_target_nor_temp(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "net.onnx"
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
