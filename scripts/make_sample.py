"""Regenerate the bundled sample, bnexport/sample/, from the Fashion-MNIST test set.

The sample is the first 100 test images of each class (1000 in all), kept in test-set order, written
as gzip'd IDX files with a deterministic gzip header (no file name, mtime 0, level 9), so running
this again on the same IDX files reproduces the shipped files byte for byte:

    .venv/bin/python scripts/make_sample.py [--data-dir DIR] [--out bnexport/sample]

Prints the indices' range and each file's size and sha256.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bnexport.data import (
    SAMPLE_FILES,
    SAMPLE_PER_CLASS,
    find_data_dir,
    load_split,
    sample_indices,
    write_idx,
)
from bnexport.files import sha256_file

REPO = Path(__file__).resolve().parent.parent


def make_sample(data_dir: Path | None, out: Path) -> list[Path]:
    """Write the sample's two IDX files into `out`; return their paths."""
    source = find_data_dir(data_dir, splits=("test",))
    images, labels = load_split(source, "test")
    idx = sample_indices(labels, SAMPLE_PER_CLASS)
    paths = [out / SAMPLE_FILES[0], out / SAMPLE_FILES[1]]
    write_idx(paths[0], images[idx])
    write_idx(paths[1], labels[idx].astype("uint8"))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=None, help="Fashion-MNIST IDX directory")
    parser.add_argument("--out", type=Path, default=REPO / "bnexport" / "sample")
    args = parser.parse_args()
    for path in make_sample(args.data_dir, args.out):
        print(f"{path}  {path.stat().st_size} bytes  sha256 {sha256_file(path)}")


if __name__ == "__main__":
    main()
