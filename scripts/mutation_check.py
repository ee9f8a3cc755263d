"""Run hand-picked mutants of bnexport against the test suite: each must be killed (a test fails).

Each mutant is one textual change to one file (the text must occur exactly once). The script
copies the committed tree (``git archive HEAD``) into a temporary folder once per mutant, applies
the change, and runs pytest there on the tests that guard that code (``-x``: the first failure
kills the mutant), with the copy first on ``PYTHONPATH`` so the mutated package is the one
imported. Prints one line per mutant and exits 1 if any survives.

Usage::

    .venv/bin/python scripts/mutation_check.py [--only NAME ...] [--list]
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    """``old`` → ``new`` in ``path``; ``tests`` are the pytest targets that must kill it."""

    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTANTS = (
    Mutant(
        "noise rule: <= becomes <",
        "bnexport/parity/tolerance.py",
        "return bool(float(error) <= self.limit(noise, eps, precision))",
        "return bool(float(error) < self.limit(noise, eps, precision))",
        ("tests/parity/test_tolerance.py",),
    ),
    Mutant(
        "fixed rule: <= becomes <",
        "bnexport/parity/tolerance.py",
        "ok = np.abs(cand - ref) <= self.allowed(ref)",
        "ok = np.abs(cand - ref) < self.allowed(ref)",
        ("tests/parity/test_tolerance.py",),
    ),
    Mutant(
        "CPU-fallback guard removed",
        "bnexport/ort.py",
        "    if not got or got[0] != wanted:\n        raise ProviderUnavailableError(",
        "    if False:\n        raise ProviderUnavailableError(",
        ("tests/test_ort.py",),
    ),
    Mutant(
        "fold self-check never fails",
        "bnexport/fold/verify.py",
        "        raise FoldError(_self_check_message(result, worst, deterministic))",
        "        pass",
        ("tests/fold/test_self_check.py",),
    ),
    Mutant(
        "writes not atomic",
        "bnexport/files.py",
        "    with atomic_paths([path]) as (tmp,):\n        yield tmp",
        "    yield Path(path)",
        ("tests/test_files.py",),
    ),
)


def _copy_tree(dest: Path) -> None:
    """The committed tree (HEAD) into ``dest``, with ``bnexport/cli`` → ``cli`` as installed."""
    archive = subprocess.run(
        ["git", "archive", "--format=tar", "HEAD"], cwd=ROOT, check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    (dest / "bnexport" / "cli").symlink_to(dest / "cli", target_is_directory=True)


def run(mutant: Mutant) -> tuple[bool, float, str]:
    """``(killed, seconds, last output line)``; killed means pytest's exit code 1 (a test failed):
    any other failure (no tests collected, a usage error) is not a kill, and stops the script."""
    with tempfile.TemporaryDirectory(prefix="bnexport-mutant-") as tmp:
        tree = Path(tmp)
        _copy_tree(tree)
        target = tree / mutant.path
        text = target.read_text()
        if text.count(mutant.old) != 1:
            raise SystemExit(f"{mutant.name}: the text to mutate is not in {mutant.path} once")
        target.write_text(text.replace(mutant.old, mutant.new))
        env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *mutant.tests],
            cwd=tree,
            env=env,
            capture_output=True,
            text=True,
        )
        lines = [line for line in proc.stdout.splitlines() if line.strip()]
        last = lines[-1] if lines else proc.stderr.strip()
        if proc.returncode not in (0, 1):
            raise SystemExit(f"{mutant.name}: pytest exited {proc.returncode}: {last}")
        return proc.returncode == 1, time.perf_counter() - start, last


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="mutants whose name contains")
    parser.add_argument("--list", action="store_true", help="list the mutants")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.only or any(o in m.name for o in args.only)]
    if args.list:
        print("\n".join(f"{m.name}: {m.path} ({', '.join(m.tests)})" for m in chosen))
        return 0
    survived = 0
    for mutant in chosen:
        killed, seconds, last = run(mutant)
        survived += not killed
        verdict = "killed" if killed else "SURVIVED"
        print(f"{verdict:8}  {mutant.name}  ({seconds:.0f} s; {last})", flush=True)
    return 1 if survived else 0


if __name__ == "__main__":
    raise SystemExit(main())
