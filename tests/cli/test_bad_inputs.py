"""Every command against malformed files and hostile options, through the CLI: exit 2 (or the
documented code), exactly one line on stderr, no traceback, nothing left behind, bounded time.

The tables are the contract (docs/reference.md): a command or option that reads a file, a size,
a count, a thread number or a duration gets its rows here. The malformed ONNX files are made once
from one export of the shipped model (`malformed_onnx`); each row runs in-process with its own
output folder and a timer, except the few whose point is what onnxruntime itself would print on
the real stderr, which run the installed ``bnexport``.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from malformed_onnx import make_all
from onnx import numpy_helper
from typer.testing import CliRunner

from bnexport.cli.app import app

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "models" / "net.pt"
BNEXPORT = Path(sys.executable).parent / "bnexport"
CASE_TIMEOUT_S = 60  # a refusal comes before any work: seconds at most, never a hang
LONG = "n" * 300  # one name past the 255-byte limit
EDGE = "n" * 249  # EDGE.onnx fits in 255 bytes, EDGE.failed.onnx does not
TUNE_FAST = ["--budget", "1", "--screen-repeats", "3", "--repeats", "3", "--finalists", "1"]
TUNE_FAST += ["--min-time", "0.001", "--warmup", "0", "--cooldown", "0"]
BENCH_FAST = ["--repeats", "1", "--min-time", "0.001", "--warmup", "0", "--cooldown", "0"]
BENCH_FAST += ["--batch-sizes", "1", "--no-cuda"]

runner = CliRunner()


class _Code:
    """Unpickling it would run ``os.system`` (bnexport must never unpickle it)."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("echo unpickled",))


class CaseTimeout(BaseException):
    """A row ran past `CASE_TIMEOUT_S` (a BaseException: the CLI's error boundary lets it by)."""


@pytest.fixture(scope="session")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The shipped model, its export, every malformed file, and hostile inputs of other kinds."""
    root = tmp_path_factory.mktemp("bad_inputs")
    good = root / "good.onnx"
    result = runner.invoke(app, ["onnx", str(SHIPPED), "-o", str(good), "--no-check"])
    assert result.exit_code == 0, result.output
    proto = onnx.load(str(good))
    made = make_all(proto, root / "bad")
    os.link(good, root / "good_link.onnx")  # a hard link: the same file under another name
    evil = root / "evil.pt"  # a plain pickle that would call os.system when loaded
    evil.write_bytes(pickle.dumps({"state_dict": _Code()}))
    other = onnx.load(str(good))  # the same graph, other weights: computes something else
    for init in other.graph.initializer:
        if len(init.dims) == 2:
            array = numpy_helper.to_array(init) * np.float32(3.0)
            init.CopyFrom(numpy_helper.from_array(array, init.name))
    (root / "other.onnx").write_bytes(other.SerializeToString())
    return {
        "ckpt": SHIPPED,
        "good": good,
        "good_link": root / "good_link.onnx",
        "evil": evil,
        "other": root / "other.onnx",
        **made,
    }


def _expand(args: tuple[str, ...], files: dict[str, Path], out: Path) -> list[str]:
    names = {k: str(v) for k, v in files.items()} | {"out": str(out), "long": LONG, "edge": EDGE}
    return [a.format(**names) for a in args]


@dataclasses.dataclass(frozen=True)
class Case:
    """One row: the command line (``{ckpt}``, ``{good}``, a malformed file's name, ``{out}``
    (the row's own empty folder), ``{long}``), a piece of the one error line, and a piece it must
    no longer say (the misleading messages of old)."""

    args: tuple[str, ...]
    says: str
    code: int = 2
    not_says: str = ""


def _timer() -> Iterator[None]:
    def expire(*_: object) -> None:
        raise CaseTimeout(f"still running after {CASE_TIMEOUT_S} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, CASE_TIMEOUT_S)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run_case(case: Case, files: dict[str, Path], tmp_path: Path) -> str:
    """Run the row in-process and check what every row promises; return its error line."""
    out = tmp_path / "out"
    out.mkdir()
    shared = sorted(p.name for p in files["good"].parent.rglob("*"))
    started = time.perf_counter()
    timer = _timer()
    next(timer)
    try:
        result = runner.invoke(app, _expand(case.args, files, out))
    finally:
        timer.close()
    assert time.perf_counter() - started < CASE_TIMEOUT_S
    assert result.exit_code == case.code, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output and "unexpected" not in result.stderr
    line = lines[0]
    assert line.startswith("bnexport: error: "), line
    assert case.says in line, line
    assert not case.not_says or case.not_says not in line, line
    assert result.stdout == "", result.stdout
    assert list(out.iterdir()) == [], "a refused command left a file"
    assert sorted(p.name for p in files["good"].parent.rglob("*")) == shared
    return line


# ---- commands × malformed ONNX files ------------------------------------------------------------

#: What each malformed file is refused with, whichever command reads it.
MALFORMED = {
    "empty": "is empty (0 bytes)",
    "truncated": "is not an ONNX model",
    "text": "is not an ONNX model",
    "directory": "is a directory, not an ONNX model",
    "custom_domain": "the custom op com.example:Frobnicate",
    "opset_99": "imports opset 99",
    "cycle": "its graph has a cycle",
    "huge_dims": "declares dims [1048576, 1048576]",
    "wrong_shape": "onnx's shape inference fails",
    "external_escapes": "outside the model's folder",
    "external_missing": "which is missing",
    "external_huge_claim": "but its external data claims 1099511627776",
    "no_inputs": "takes no inputs",
    "string_input": "of type tensor(string)",
}
READERS = {
    "check": ("check", "{%s}", "--against", "{ckpt}", "--json", "{out}/r.json"),
    "tune": ("tune", "{%s}", "-o", "{out}/t.onnx", "--json", "{out}/t.json", *TUNE_FAST),
    "bench --onnx": ("bench", "{ckpt}", "--onnx", "{%s}", "--json", "{out}/b.json", *BENCH_FAST),
    "bench --tuned": ("bench", "{ckpt}", "--tuned", "{%s}", *BENCH_FAST),
    "package": ("package", "{%s}", "--repository", "{out}/repo"),
}
FILE_ROWS = {
    f"{command} {name}": Case(tuple(a.replace("%s", name) for a in args), says, not_says="check")
    for command, args in READERS.items()
    for name, says in MALFORMED.items()
}
FILE_ROWS |= {
    "bench --onnx extra_input": Case(
        ("bench", "{ckpt}", "--onnx", "{extra_input}", *BENCH_FAST), "takes 2 inputs"
    ),
    "bench --onnx fixed_batch_3": Case(
        ("bench", "{ckpt}", "--onnx", "{fixed_batch_3}", *BENCH_FAST), "fixed batch of 3"
    ),
    "bench --tuned extra_input": Case(
        ("bench", "{ckpt}", "--tuned", "{extra_input}", *BENCH_FAST), "takes 2 inputs"
    ),
    "tune fixed_batch_3": Case(("tune", "{fixed_batch_3}", "-o", "{out}/t.onnx"), "batch of 3"),
    "check extra_input": Case(("check", "{extra_input}", "--against", "{ckpt}"), "'extra'"),
    # tune's advice for external data is to write into the input's folder: still refused
    "tune external_escapes, -o beside it": Case(
        ("tune", "{external_escapes}", "-o", "{out}/../t.onnx"), "outside the model's folder"
    ),
    "tune external_missing, -o beside it": Case(
        ("tune", "{external_missing}", "-o", "{out}/../t.onnx"), "which is missing"
    ),
}


@pytest.mark.parametrize("case", FILE_ROWS.values(), ids=FILE_ROWS.keys())
def test_a_malformed_onnx_file_is_one_line_exit_2(
    case: Case, files: dict[str, Path], tmp_path: Path
) -> None:
    if "../t.onnx" in " ".join(case.args):  # -o beside the input (its folder)
        name = case.args[1].strip("{}")
        case = dataclasses.replace(case, args=(*case.args[:3], str(files[name].parent / "t.onnx")))
    run_case(case, files, tmp_path)


# ---- hostile options -----------------------------------------------------------------------------

TUNE = ("tune", "{good}", "-o", "{out}/t.onnx")
TRAIN = ("train", "--sample", "-o", "{out}/n.pt")
CHECK = ("check", "{good}", "--against", "{ckpt}")
BENCH = ("bench", "{ckpt}")
OPTION_ROWS = {
    # sizes and counts past the memory: refused up front with the estimate
    "check --samples 10000000": Case((*CHECK, "--samples", "10000000"), "GiB of memory"),
    "onnx --samples 10000000": Case(
        ("onnx", "{ckpt}", "-o", "{out}/m.onnx", "--samples", "10000000"), "GiB of memory"
    ),
    "bench --batch-sizes 10000000": Case((*BENCH, "--batch-sizes", "10000000"), "GiB of memory"),
    "tune -b 100000000": Case((*TUNE, "-b", "100000000"), "GiB of memory"),
    "--input-shape 3,99999999999999999999999,8": Case(
        ("onnx", "{ckpt}", "-o", "{out}/m.onnx", "--input-shape", "3,99999999999999999999999,8"),
        "a size is too large",
    ),
    "check --model --input-shape huge": Case(
        ("check", "{good}", "--model", "m:f", "--input-shape", "3,99999999999999999999999,8"),
        "a size is too large",
    ),
    # durations: finite and bounded
    "tune --cooldown inf": Case((*TUNE, "--cooldown", "inf"), "--cooldown inf"),
    "tune --min-time inf": Case((*TUNE, "--min-time", "inf"), "--min-time inf"),
    "tune --budget inf": Case((*TUNE, "--budget", "inf"), "--budget inf"),
    "tune --warmup 1e9": Case((*TUNE, "--warmup", "1e9"), "--warmup 1e+09"),
    "tune --warmup inf": Case((*TUNE, "--warmup", "inf"), "--warmup inf"),
    "tune --min-time nan": Case((*TUNE, "--min-time", "nan"), "finite"),
    "bench --warmup inf": Case((*BENCH, "--warmup", "inf"), "--warmup inf"),
    "bench --min-time inf": Case((*BENCH, "--min-time", "inf"), "--min-time inf"),
    "bench --cooldown inf": Case((*BENCH, "--cooldown", "inf"), "--cooldown inf"),
    "check --inputs not-an-npz": Case(
        (*CHECK, "--inputs", "{text}"), "not a .npz of arrays", not_says="allow_pickle"
    ),
    "load --duration inf": Case(
        ("load", "--url", "127.0.0.1:1", "--name", "net", "--duration", "inf"), "--duration inf"
    ),
    "check --url --timeout inf": Case(
        (
            "check",
            "--url",
            "127.0.0.1:1",
            "--name",
            "net",
            "--against",
            "{ckpt}",
            "--timeout",
            "inf",
        ),
        "--timeout inf",
    ),
    # thread numbers: capped relative to the CPUs
    "bench --threads 100000": Case((*BENCH, "--threads", "100000"), "threads (4 per"),
    "bench --threads 1000": Case((*BENCH, "--threads", "1000"), "threads (4 per"),
    "tune --threads 100000": Case((*TUNE, "--threads", "100000"), "threads (4 per"),
    "tune --fix inter_op_num_threads=1000000": Case(
        (*TUNE, "--fix", "inter_op_num_threads=1000000"), "--fix inter_op_num_threads=1000000"
    ),
    "train --threads 100000": Case((*TRAIN, "--threads", "100000"), "threads (4 per"),
    # seeds and temperatures
    "train --seed 2**70": Case((*TRAIN, "--seed", str(2**70)), "2**64 - 1"),
    "train --temperature 1e40": Case(
        (*TRAIN, "--temperature", "1e40"),
        "--temperature 1e+40: give a temperature > 0",
        not_says="--lr",
    ),
    "train --temperature 0": Case((*TRAIN, "--temperature", "0"), "> 0"),
    "train --temperature -1": Case((*TRAIN, "--temperature", "-1"), "> 0"),
    "fold --temperature 0": Case(
        ("fold", "{ckpt}", "-o", "{out}/m.pt2", "--temperature", "0"), "> 0"
    ),
    "onnx --temperature -1": Case(
        ("onnx", "{ckpt}", "-o", "{out}/m.onnx", "--temperature", "-1"), "> 0"
    ),
    "check --temperature 0": Case((*CHECK, "--temperature", "0"), "> 0"),
    "check --seed -1": Case((*CHECK, "--seed", "-1"), "greater than or equal to 0"),
    "check --seed 2**70": Case((*CHECK, "--seed", str(2**70)), "less than or equal to"),
    "bench --temperature -1": Case((*BENCH, "--temperature", "-1"), "> 0"),
}

#: Every path a command writes, with a name over 255 bytes: one line naming the option.
WRITERS = {
    "train -o": ("train", "--sample", "-o", "{out}/{long}.pt"),
    "fold -o": ("fold", "{ckpt}", "-o", "{out}/{long}.pt2"),
    "fold --report-json": ("fold", "{ckpt}", "-o", "{out}/m.pt2", "--report-json", "{out}/{long}"),
    "onnx -o": ("onnx", "{ckpt}", "-o", "{out}/{long}.onnx"),
    "onnx --report-json": ("onnx", "{ckpt}", "-o", "{out}/m.onnx", "--report-json", "{out}/{long}"),
    "check --json": (*CHECK, "--json", "{out}/{long}"),
    "check --junit": (*CHECK, "--junit", "{out}/{long}"),
    "check --markdown": (*CHECK, "--markdown", "{out}/{long}"),
    "check --save-inputs": (*CHECK, "--save-inputs", "{out}/{long}"),
    "bench --json": (*BENCH, "--json", "{out}/{long}"),
    "tune -o": ("tune", "{good}", "-o", "{out}/{long}.onnx"),
    "tune --json": (*TUNE, "--json", "{out}/{long}/x.json"),
    "tune --keep-failed": ("tune", "{good}", "-o", "{out}/{edge}.onnx", "--keep-failed"),
    "onnx --keep-failed": ("onnx", "{ckpt}", "-o", "{out}/{edge}.onnx", "--keep-failed"),
    "fold --keep-failed": ("fold", "{ckpt}", "-o", "{out}/{edge}.pt2", "--keep-failed"),
}
OPTION_ROWS |= {
    # output paths: refused before any work, all or nothing (tune too)
    "tune -o a hard link of the input": Case(
        ("tune", "{good}", "-o", "{good_link}"), "is the input"
    ),
    "tune --json a hard link of the input": Case(
        ("tune", "{good}", "-o", "{out}/t.onnx", "--json", "{good_link}"), "is the input"
    ),
    "tune -o /proc/t.onnx": Case(("tune", "{good}", "-o", "/proc/t.onnx"), "/proc"),
    "tune --json /proc/t.json": Case(
        ("tune", "{good}", "-o", "{out}/t3.onnx", "--json", "/proc/t.json"), "/proc"
    ),
    "onnx -o /proc/m.onnx": Case(("onnx", "{ckpt}", "-o", "/proc/m.onnx"), "/proc"),
    "bench --json a hard link of --onnx": Case(
        ("bench", "{ckpt}", "--onnx", "{good}", "--json", "{good_link}"), "is the input"
    ),
    "onnx -o a directory": Case(("onnx", "{ckpt}", "-o", "{directory}"), "is a directory"),
    # misleading messages of old
    "fold on a directory named x.onnx": Case(
        ("fold", "{directory}", "-o", "{out}/m.pt2"), "is a directory", not_says="not found"
    ),
    "--model ../mods/mynets:build": Case(
        ("onnx", "--model", "../mods/mynets:build", "--input-shape", "3,8", "-o", "{out}/m.onnx"),
        "is a file path; --model takes a module",
        not_says="in your code",
    ),
    "tune on a string-input model": Case(
        ("tune", "{string_input}", "-o", "{out}/t.onnx"), "tensor(string)", not_says="check"
    ),
    "a pickle carrying code as the checkpoint": Case(
        ("fold", "{evil}", "-o", "{out}/m.pt2"), "a plain pickle that imports", not_says="corrupt"
    ),
    "an ONNX file where the checkpoint goes": Case(
        ("onnx", "{good}", "-o", "{out}/m.onnx"),
        "is an ONNX model, not a checkpoint",
        not_says="corrupt",
    ),
    "bench: an ONNX file where the checkpoint goes": Case(
        ("bench", "{good}"), "is an ONNX model, not a checkpoint"
    ),
}


@pytest.mark.parametrize("case", OPTION_ROWS.values(), ids=OPTION_ROWS.keys())
def test_a_hostile_option_is_one_line_exit_2(
    case: Case, files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bnexport.limits

    # The memory rows ask for 29-584 GiB: refused here whatever the machine running the suite has.
    monkeypatch.setattr(bnexport.limits, "available_memory", lambda: 16 * 1024**3)
    run_case(case, files, tmp_path)


@pytest.mark.parametrize("args", WRITERS.values(), ids=WRITERS.keys())
def test_a_name_too_long_is_one_line_naming_the_option(
    args: tuple[str, ...], files: dict[str, Path], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    flag = request.node.callspec.id.split(" ", 1)[1]
    line = run_case(Case(args, "File name too long"), files, tmp_path)
    assert line.startswith(f"bnexport: error: {flag} ") and "255 bytes" in line


# ---- exit codes that mean one thing --------------------------------------------------------------


def test_debug_adds_the_traceback_and_keeps_the_exit_code(
    files: dict[str, Path], tmp_path: Path
) -> None:
    args = ["--debug", "tune", str(files["empty"]), "-o", str(tmp_path / "t.onnx")]
    result = runner.invoke(app, args)
    assert result.exit_code == 2  # a bad input, not the parity-mismatch 1
    lines = result.stderr.splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert lines[-1].startswith("bnexport: error: ONNX model ") and "is empty" in lines[-1]
    assert not (tmp_path / "t.onnx").exists()


def test_bench_exits_1_naming_the_candidate_that_disagrees(
    files: dict[str, Path], tmp_path: Path
) -> None:
    json_path = tmp_path / "b.json"
    args = ["bench", str(files["ckpt"]), "--onnx", str(files["other"]), *BENCH_FAST]
    result = runner.invoke(app, [*args, "--json", str(json_path)])
    assert result.exit_code == 1, result.output
    assert "MISMATCH: onnxruntime CPU, bnexport folded export" in result.stdout
    assert "Traceback" not in result.output and json_path.exists()  # a result, reported


# ---- onnxruntime's own lines reach the real stderr only with --verbose ---------------------------


def _console(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BNEXPORT), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=CASE_TIMEOUT_S * 2,
        cwd=REPO,
    )


@pytest.mark.parametrize(
    "command",
    [
        ("tune", "{runtime_failure}", "-o", "{out}/t.onnx", *TUNE_FAST),
        ("bench", "{ckpt}", "--onnx", "{runtime_failure}", *BENCH_FAST),
    ],
    ids=["tune", "bench --onnx"],
)
def test_a_file_that_cannot_run_is_one_line_without_onnxruntimes_log(
    command: tuple[str, ...], files: dict[str, Path], tmp_path: Path
) -> None:
    """The file passes every static check; onnxruntime fails when it runs (and would log)."""
    proc = _console(*_expand(command, files, tmp_path))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("bnexport: error: "), proc.stderr
    assert "cannot run on onnxruntime" in lines[0] and "runtime_failure.onnx" in lines[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "command",
    [
        ("tune", "{wrong_shape}", "-o", "{out}/t.onnx", *TUNE_FAST),
        ("bench", "{ckpt}", "--onnx", "{external_huge_claim}", *BENCH_FAST),
    ],
    ids=["tune wrong_shape", "bench --onnx external_huge_claim"],
)
def test_files_onnxruntime_used_to_log_about_are_one_line_on_the_real_stderr(
    command: tuple[str, ...], files: dict[str, Path], tmp_path: Path
) -> None:
    proc = _console(*_expand(command, files, tmp_path))
    assert proc.returncode == 2
    assert len(proc.stderr.splitlines()) == 1 and "onnxruntime:" not in proc.stderr, proc.stderr


def test_check_on_a_fixed_batch_file_does_not_blame_an_output_shape(
    files: dict[str, Path],
) -> None:
    args = ["check", str(files["fixed_batch_3"]), "--against", str(files["ckpt"])]
    result = runner.invoke(app, [*args, "--samples", "2", "--opt-levels", "all"])
    assert result.exit_code == 0, result.output  # checkable at its batch, no output blamed


def test_check_on_a_file_that_cannot_run_is_exit_2(files: dict[str, Path], tmp_path: Path) -> None:
    """Exit 2 (bad input), not 1 (a mismatch), and no report written; its progress lines come
    before the one error line (the runs had to be tried), onnxruntime's own lines never."""
    report = tmp_path / "r.json"
    proc = _console("check", files["runtime_failure"], "--against", files["ckpt"], "--json", report)
    assert proc.returncode == 2, proc.stderr
    *progress, last = proc.stderr.splitlines()
    assert all(line.startswith("parity [") for line in progress), proc.stderr
    assert last.startswith("bnexport: error: ") and "cannot run on onnxruntime" in last
    assert not report.exists()


def test_verbose_lets_onnxruntimes_log_through(files: dict[str, Path], tmp_path: Path) -> None:
    args = ["tune", files["runtime_failure"], "-o", tmp_path / "t.onnx", *TUNE_FAST, "--verbose"]
    proc = _console(*args)
    assert proc.returncode == 2
    assert "[E:onnxruntime" in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("bnexport: error: ")


# ---- one rule for a file whose parity check failed (onnx, fold, tune) ----------------------------


def _fail_parity(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> None:
    """Make ``module.name`` (a parity check) report a failure on what it really measured."""
    real = getattr(module, name)

    def failing(*args: object, **kwargs: object) -> object:
        return dataclasses.replace(real(*args, **kwargs), passed=False)

    monkeypatch.setattr(module, name, failing)


@pytest.mark.parametrize("keep", [False, True], ids=["removed", "--keep-failed"])
def test_onnx_leaves_nothing_at_o_when_parity_fails(
    keep: bool, files: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "m.onnx"
    out.write_text("an older file")  # not this run's result: it goes too
    args = ["onnx", str(files["ckpt"]), "-o", str(out), "--tolerance", "fixed"]
    args += ["--rtol", "0", "--atol", "0", "--samples", "2"]  # fp32 ≠ onnxruntime: fails
    result = runner.invoke(app, args + (["--keep-failed"] if keep else []))
    assert result.exit_code == 1, result.output
    assert not out.exists()
    failed = tmp_path / "m.failed.onnx"
    assert failed.exists() == keep
    if keep:
        assert onnx.load(str(failed)).graph.output[0].name == "logits"
        assert f"kept as {failed}" in result.stdout


@pytest.mark.parametrize("keep", [False, True], ids=["removed", "--keep-failed"])
def test_fold_leaves_nothing_at_o_when_parity_fails(
    keep: bool, files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bnexport.parity.program

    _fail_parity(monkeypatch, bnexport.parity.program, "check_program")
    out, report = tmp_path / "m.pt2", tmp_path / "r.json"
    args = ["fold", str(files["ckpt"]), "-o", str(out), "--report-json", str(report)]
    result = runner.invoke(app, args + (["--keep-failed"] if keep else []))
    assert result.exit_code == 1, result.output
    assert not out.exists() and report.exists()  # the report says what failed
    assert (tmp_path / "m.failed.pt2").exists() == keep


@pytest.mark.parametrize("keep", [False, True], ids=["removed", "--keep-failed"])
def test_tune_leaves_nothing_at_o_when_parity_fails(
    keep: bool, files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    import bnexport.tune.run

    _fail_parity(monkeypatch, bnexport.tune.run, "check_outputs")
    out, report = tmp_path / "t.onnx", tmp_path / "t.json"
    out.write_text("an older file")
    args = ["tune", str(files["good"]), "-o", str(out), "--json", str(report), *TUNE_FAST]
    result = runner.invoke(app, args + (["--keep-failed"] if keep else []))
    assert result.exit_code == 1, result.output
    assert not out.exists()
    failed = tmp_path / "t.failed.onnx"
    assert failed.exists() == keep
    data = json.loads(report.read_text())  # written with the file, all or nothing
    assert data["parity"]["passed"] is False
    assert data["output"] == (str(failed) if keep else None)


def test_a_library_failure_is_one_line_and_unexpected_is_kept_for_bugs() -> None:
    import errno

    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    from bnexport.cli.errors import error_line

    full = OSError(errno.ENOSPC, "No space left on device", "out.onnx")
    assert error_line(full) == (
        "cannot use out.onnx: No space left on device; free some disk space or write elsewhere"
    )
    assert error_line(MemoryError()).startswith("out of memory (MemoryError); ask for less")
    torch_oom = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 9 GB")
    assert error_line(torch_oom).startswith("out of memory (DefaultCPUAllocator")
    assert error_line(Fail("boom")).startswith("onnxruntime failed: boom;")
    assert error_line(KeyError("x")) == "unexpected KeyError: 'x' (rerun with --debug)"
