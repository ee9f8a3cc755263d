"""Run every real model of ``tests/real/zoo.py`` through the CLI as a user would: ``bnexport onnx``
then ``bnexport check`` with default options, each in its own process; report exit codes, the
parity verdicts and wall times.

Input shapes are the zoo's (64×64 images) unless ``--size NAME=S`` sets a square image size
(``--size torchvision/resnet50=224 --size torchvision/inception_v3=299``, the sizes
docs/parity.md times). Prints a markdown table on stdout; progress on stderr.

Usage::

    .venv/bin/python scripts/real_cli.py [--models NAME ...] [--size NAME=S ...]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from real.cli_models import attribute  # noqa: E402
from real.zoo import REAL_MODELS, input_shapes  # noqa: E402

BNEXPORT = [sys.executable, "-m", "bnexport"]


def shape_options(name: str, size: int | None) -> list[str]:
    """``--input-shape`` options for zoo model ``name`` (image size ``size`` if given)."""
    options: list[str] = []
    for k, shape in enumerate(input_shapes(name)):
        if size is not None and k == 0 and len(shape) == 3:
            shape = (shape[0], size, size)
        options += ["--input-shape", ",".join(map(str, shape))]
    return options


def run(args: list[str]) -> tuple[int, float, str]:
    """``(exit code, seconds, the verdict line)`` of one bnexport command."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), "COLUMNS": "200"}
    start = time.perf_counter()
    proc = subprocess.run([*BNEXPORT, *args], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    verdict = next(
        (ln for ln in reversed(lines) if ln.startswith(("PASS", "FAIL", "bnexport: error"))),
        lines[-1] if lines else "",
    )
    return proc.returncode, seconds, verdict


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(REAL_MODELS), metavar="NAME")
    parser.add_argument("--size", action="append", default=[], metavar="NAME=S")
    args = parser.parse_args(argv)
    sizes = {}
    for item in args.size:
        name, _, value = item.partition("=")
        if name not in REAL_MODELS or not value.isdigit():
            parser.error(f"--size {item}: expected a zoo model name = a square image size")
        sizes[name] = int(value)
    rows = ["| model | input | `onnx` exit | `onnx` s | `check` exit | `check` s | verdict |"]
    rows.append("| --- | --- | --- | --- | --- | --- | --- |")
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models or list(REAL_MODELS):
            shapes = shape_options(name, sizes.get(name))
            source = ["--model", f"real.cli_models:{attribute(name)}", *shapes]
            path = str(Path(tmp) / "model.onnx")
            onnx_rc, onnx_s, _ = run(["onnx", *source, "-o", path])
            check_rc, check_s, verdict = run(["check", path, *source])
            failed += onnx_rc != 0 or check_rc != 0
            shown = " ".join(shapes[1::2])
            rows.append(
                f"| {name} | {shown} | {onnx_rc} | {onnx_s:.1f} | {check_rc} | {check_s:.1f} "
                f"| {verdict} |"
            )
            print(
                f"{name}: onnx {onnx_rc} ({onnx_s:.1f} s), check {check_rc} ({check_s:.1f} s)",
                file=sys.stderr,
                flush=True,
            )
    print("\n".join(rows))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
