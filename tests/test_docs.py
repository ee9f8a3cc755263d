"""The docs stay true: the README is short, renders, and its code blocks run with the output shown;
docs/ci.md's workflow parses and its bnexport commands exist with their options (and run); every
relative link resolves; no page reads as a development log; nothing refers to files outside the
repository.

A fenced block's info string says how it is treated: ``sh`` and ``python`` blocks run in order in
one scratch folder (``models/`` linked in), ``python file=NAME`` is written to NAME, ``console``
blocks run each ``$ …`` line and compare the output shown with what the CLI prints at 100 columns
(numbers and spacing aside; ``…`` stands for lines cut), ``exit=N`` is the exit code expected, and
``norun="reason"`` is a block that cannot run here, with the reason. The bnexport commands of a
block that does not run are still checked against the CLI's options.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from docs_blocks import (
    RUNNABLE,
    Block,
    Ran,
    blocks,
    bnexport_calls,
    run_block,
    run_command,
    scratch,
    shown_lines,
    shown_output_mismatch,
    tokens,
    unknown_options,
)

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CI_PAGE = ROOT / "docs" / "ci.md"
PAGES = [README, ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 150
README_SECTIONS = (
    "Install",
    "Quick start",
    "What PASS and FAIL look like",
    "Commands and exit codes",
    "In CI",
    "Serving",
    "More",
)


def _shell_blocks() -> list[Block]:
    return [b for page in PAGES for b in blocks(page) if b.lang in {"sh", "console", "bash"}]


@pytest.mark.parametrize("block", _shell_blocks(), ids=str)
def test_every_bnexport_command_in_the_docs_exists_with_its_options(block: Block) -> None:
    bad = [u for call in bnexport_calls(block.text) for u in unknown_options(call)]
    assert not bad, f"{block}: the CLI has no {bad}"


def test_the_option_check_catches_a_wrong_option() -> None:
    assert unknown_options(["check", "x.onnx", "--against", "m.pt", "--sample", "3"]) == [
        "check --sample"
    ]
    assert unknown_options(["chek", "x.onnx"]) == ["command chek"]
    assert unknown_options(["--debug", "onnx", "m.pt", "-o", "x.onnx"]) == []
    assert bnexport_calls("cd x && bnexport check a.onnx \\\n  --json r.json  # c") == [
        ["check", "a.onnx", "--json", "r.json"]
    ]


# ---- the README: short, the sections, renders, the make targets ---------------------------------


def test_the_readme_is_a_five_minute_read_with_its_sections() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= README_MAX_LINES
    first_screen = "\n".join(text.splitlines()[:30])
    assert "make demo" in first_screen and "make test" in first_screen
    headings = [
        tokens(README)[i + 1].content
        for i, t in enumerate(tokens(README))
        if t.type == "heading_open" and t.tag == "h2"
    ]
    assert tuple(headings) == README_SECTIONS
    for needed in ("download.pytorch.org/whl/cpu", "--model", "--input-shape", "docs/ci.md"):
        assert needed in text
    assert "docs/images/" in text and "docs/serving.md" in text


def test_the_readme_names_every_extra_pyproject_defines() -> None:
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    text = README.read_text(encoding="utf-8")
    for extra in extras:
        assert f"`{extra}`" in text, extra


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_markdown_renders_headings_tables_and_fences(page: Path) -> None:
    toks = tokens(page)
    assert [t.tag for t in toks if t.type == "heading_open"][:1] == ["h1"]
    assert sum(t.type == "heading_open" and t.tag == "h1" for t in toks) == 1
    source = page.read_text(encoding="utf-8").splitlines()
    fenced = {i for t in toks if t.type == "fence" for i in range(t.map[0], t.map[1])}
    for fence in (t for t in toks if t.type == "fence"):
        closing = source[fence.map[1] - 1].strip() if fence.map[1] - 1 > fence.map[0] else ""
        where = f"{page.name}:{fence.map[0] + 1}"
        assert re.fullmatch(r"(`{3,}|~{3,})", closing), f"{where}: a fence not closed"
    # every block of |-lines outside code renders as a table with the header's column count
    tables = [t for t in toks if t.type == "table_open"]
    starts = [
        i
        for i, line in enumerate(source)
        if line.startswith("|")
        and i not in fenced
        and (i == 0 or not source[i - 1].startswith("|"))
    ]
    assert len(tables) == len(starts), f"{page.name}: a |-table that does not render"
    for table in tables:
        start, end = table.map
        rows = [re.sub(r"`[^`]*`", "code", source[i]) for i in range(start, end)]
        cells = [len(re.findall(r"(?<!\\)\|", row)) for row in rows]
        assert len(set(cells)) == 1, f"{page.name}:{start + 1}: rows of different widths"


def _links(page: Path) -> list[str]:
    out = []
    for tok in tokens(page):
        for child in tok.children or []:
            if child.type == "link_open":
                out.append(child.attrs["href"])
            elif child.type == "image":
                out.append(child.attrs["src"])
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_points_to_a_file_in_the_repository(page: Path) -> None:
    for href in _links(page):
        if re.match(r"^[a-z]+:", href) or href.startswith("#"):
            continue
        target = (page.parent / href.split("#")[0]).resolve()
        assert target.exists(), f"{page.name}: {href} does not exist"
        assert target.is_relative_to(ROOT), f"{page.name}: {href} leaves the repository"


def test_make_demo_runs_the_quick_start() -> None:
    recipe = re.search(r"^demo:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.M)
    assert recipe is not None
    demo = [c for c in bnexport_calls(recipe.group(1).replace("$(BIN)/", ""))]
    assert [c[:3] for c in demo] == [["onnx", "models/net.pt", "-o"]]
    quick = [c for b in blocks(README) if b.runs for c in bnexport_calls(b.text)]
    assert ["onnx", "models/net.pt", "-o", "net.onnx"] in quick


# ---- no development log, nothing outside the repository ------------------------------------------

DEV_LOG = re.compile(r"\bissues? #?\d+|\bacceptance\b|\bthis session\b|\bhelper\b", re.I)
OUTSIDE = re.compile(
    r"\.\./shared|/work/|\bshared/(?:docs|tools)\b|(?<![\w.])\.gpu/|(?<![\w.-])/tmp/|/home/"
)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_no_page_reads_as_a_development_log(page: Path) -> None:
    found = [
        f"{page.name}:{n}: {m.group(0)}"
        for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1)
        for m in DEV_LOG.finditer(line)
    ]
    assert not found


def _repository_text_files() -> list[Path]:
    git = shutil.which("git")
    if git and (ROOT / ".git").exists():
        listed = subprocess.run(
            [git, "ls-files", "-co", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
        paths = [ROOT / p for p in listed]
    else:
        paths = [p for p in ROOT.rglob("*") if ".venv" not in p.parts and ".git" not in p.parts]
    return [p for p in paths if p.is_file() and p != Path(__file__).resolve()]


def test_nothing_in_the_repository_refers_to_files_outside_it() -> None:
    found = []
    for path in _repository_text_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if OUTSIDE.search(line):
                found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:120]}")
    assert not found


def test_the_outside_pattern_catches_what_it_must() -> None:
    for line in ("see ../shared/x", "/work/main/.venv/lib", "cat /tmp/w/part", "shared/docs/a.md"):
        assert OUTSIDE.search(line), line
    for line in ("tmp_path / 'x'", "out/net.onnx", "docs/ci.md", "pytorch#104593"):
        assert not OUTSIDE.search(line), line


# ---- the README's code blocks run, and print what they show -------------------------------------


@pytest.fixture(scope="module")
def readme_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[Ran]]:
    """Every README block that runs, in order, in one scratch folder: what each command did."""
    work = tmp_path_factory.mktemp("readme")
    env = scratch(work)
    return {b.line: run_block(b, work, env) for b in blocks(README) if b.runs}


README_BLOCKS = [b for b in blocks(README) if b.lang in RUNNABLE]


@pytest.mark.xdist_group("readme")
@pytest.mark.parametrize("block", README_BLOCKS, ids=str)
def test_every_readme_code_block_runs_or_says_why_not(
    block: Block, readme_runs: dict[int, list[Ran]]
) -> None:
    if not block.runs:
        reason = block.attrs.get("norun", "")
        assert len(reason) > 10, f"{block}: a block that does not run says why"
        return
    expected = int(block.attrs.get("exit", "0"))
    for ran in readme_runs[block.line]:
        assert ran.returncode == expected, f"{block}: {ran.command}\n{ran.stdout}\n{ran.stderr}"
    if block.lang == "console":
        (ran,) = readme_runs[block.line]
        problem = shown_output_mismatch(shown_lines(block), ran.stdout.splitlines())
        assert problem is None, f"{block}: {problem}\n--- printed:\n{ran.stdout}"


def test_the_output_comparison_sees_a_changed_line() -> None:
    printed = ["a 1.5e-07 x", "b 2 y", "PASS (3.1 s)"]
    assert shown_output_mismatch(["a 4.2e-07   x", "…", "PASS (1.0 s)"], printed) is None
    assert shown_output_mismatch(["a 1 x", "b 2 z", "…"], printed) is not None
    assert shown_output_mismatch(["b 2 y", "…"], printed) is not None  # the start is anchored
    assert shown_output_mismatch(["…", "b 2 y"], printed) is not None  # so is the end


# ---- docs/ci.md: the workflow parses, and its gate runs ------------------------------------------


def workflow() -> dict[str, Any]:
    import yaml

    (block,) = [b for b in blocks(CI_PAGE) if b.lang == "yaml"]
    data = yaml.safe_load(block.text)
    assert isinstance(data, dict)
    return data


def _steps() -> list[dict[str, Any]]:
    (job,) = workflow()["jobs"].values()
    return list(job["steps"])


def test_the_ci_workflow_parses_into_a_gate_with_its_reports() -> None:
    data = workflow()
    assert data.get("on", data.get(True)) is not None  # YAML 1.1 reads a bare `on` as True
    steps = _steps()
    uses = [s["uses"].split("@")[0] for s in steps if "uses" in s]
    assert uses == ["actions/checkout", "actions/setup-python", "actions/upload-artifact"]
    runs = "\n".join(s.get("run", "") for s in steps)
    assert "download.pytorch.org/whl/cpu" in runs and "-c constraints.txt" in runs
    assert '>> "$GITHUB_STEP_SUMMARY"' in runs
    (check,) = [c for c in bnexport_calls(runs) if c[0] == "check"]
    for pinned in ("--samples", "--batch-sizes", "--seed", "--junit", "--markdown"):
        assert pinned in check
    junit = check[check.index("--junit") + 1]
    (upload,) = [s for s in steps if s.get("uses", "").startswith("actions/upload-artifact")]
    assert junit in upload["with"]["path"] and upload["if"] == "always()"


def test_the_ci_workflow_installs_extras_pyproject_defines() -> None:
    import tomllib

    extras = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    )
    runs = "\n".join(s.get("run", "") for s in _steps())
    for group in re.findall(r"\'\.\[([a-z,]+)\]\'", runs):
        assert set(group.split(",")) <= extras, group


@pytest.mark.xdist_group("readme")
def test_the_ci_workflow_gate_runs_on_the_shipped_model(tmp_path: Path) -> None:
    env = scratch(tmp_path) | {"GITHUB_STEP_SUMMARY": str(tmp_path / "summary.md")}
    for step in _steps():
        script = step.get("run", "")
        if not script or "pip install" in script:
            continue
        ran = run_command(["bash", "-euo", "pipefail", "-c", script], tmp_path, env)
        assert ran.returncode == 0, f"{step.get('name')}: {ran.stdout}\n{ran.stderr}"
    assert "PASS" in (tmp_path / "summary.md").read_text()
    import xml.etree.ElementTree as ET

    suite = ET.parse(tmp_path / "out" / "parity.xml").getroot().find("testsuite")
    assert suite is not None and suite.get("failures") == "0"
