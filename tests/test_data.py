"""bnexport.data: IDX reading against hand-written files, every malformed-file error, dataset
discovery and its install hint, the bundled sample, `Normalize` and `to_tensor`."""

from __future__ import annotations

import gzip
import runpy
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bnexport import data
from bnexport.data import (
    FASHION_MNIST_NORMALIZE,
    INSTALL_HINT,
    Normalize,
    find_data_dir,
    load_sample,
    load_split,
    read_idx,
    to_tensor,
    write_idx,
)
from bnexport.errors import DataError

REPO = Path(__file__).resolve().parent.parent
SAMPLE_DIR = REPO / "bnexport" / "sample"


def _system_data() -> Path | None:
    try:
        return find_data_dir(None)
    except DataError:
        return None


needs_dataset = pytest.mark.skipif(
    _system_data() is None, reason=f"Fashion-MNIST not installed ({INSTALL_HINT})"
)


def idx_bytes(array: np.ndarray, code: int = 0x08) -> bytes:
    """IDX written by hand: 0, 0, dtype code, ndim, big-endian uint32 dims, big-endian payload."""
    header = struct.pack(">BBBB", 0, 0, code, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_raw(path: Path, payload: bytes) -> Path:
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)
    return path


def make_split(tmp_path: Path, n: int = 5, *, gz: bool = True, seed: int = 0) -> tuple:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    ext = ".gz" if gz else ""
    for split in ("train", "test"):
        img_name, lab_name = data.SPLITS[split]
        write_raw(tmp_path / f"{img_name}{ext}", idx_bytes(images))
        write_raw(tmp_path / f"{lab_name}{ext}", idx_bytes(labels))
    return images, labels


# --- IDX reading -----------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_read_idx_matches_numpy_written_file(tmp_path: Path, gz: bool) -> None:
    images, labels = make_split(tmp_path, n=7, gz=gz)
    ext = ".gz" if gz else ""
    got_images = read_idx(tmp_path / f"train-images-idx3-ubyte{ext}")
    got_labels = read_idx(tmp_path / f"train-labels-idx1-ubyte{ext}")
    assert got_images.dtype == np.uint8 and got_images.shape == (7, 28, 28)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)


def test_read_idx_big_endian_int32_and_float64(tmp_path: Path) -> None:
    ints = np.array([[1, -2, 70000], [3, 4, -5]], dtype=np.int32)
    floats = np.array([0.5, -1.25, 1e300])
    np.testing.assert_array_equal(read_idx(write_raw(tmp_path / "i", idx_bytes(ints, 0x0C))), ints)
    np.testing.assert_array_equal(
        read_idx(write_raw(tmp_path / "f", idx_bytes(floats, 0x0E))), floats
    )


@pytest.mark.parametrize("name", ["x-idx3-ubyte", "x-idx3-ubyte.gz"])
def test_write_idx_gives_the_hand_written_bytes(tmp_path: Path, name: str) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / name
    write_idx(path, array)
    raw = path.read_bytes()
    if name.endswith(".gz"):
        assert raw[4:8] == b"\0\0\0\0"  # gzip mtime 0: reproducible bytes
        raw = gzip.decompress(raw)
    assert raw == idx_bytes(array)


def test_load_split_types(tmp_path: Path) -> None:
    images, labels = make_split(tmp_path, n=4)
    x, y = load_split(tmp_path, "test")
    assert x.dtype == np.uint8 and x.shape == (4, 28, 28)
    assert y.dtype == np.int64 and y.tolist() == labels.tolist()
    np.testing.assert_array_equal(x, images)


def test_plain_file_preferred_over_gz(tmp_path: Path) -> None:
    make_split(tmp_path, n=3, gz=True, seed=1)
    images, _ = make_split(tmp_path, n=3, gz=False, seed=2)
    np.testing.assert_array_equal(load_split(tmp_path, "train")[0], images)


# --- malformed files: each error names the file and the values ---------------------------------


def _images_path(tmp_path: Path) -> Path:
    return tmp_path / "train-images-idx3-ubyte.gz"


def _labels_path(tmp_path: Path) -> Path:
    return tmp_path / "train-labels-idx1-ubyte.gz"


def test_wrong_magic_number(tmp_path: Path) -> None:
    make_split(tmp_path)
    # A label file where the images should be: magic 0x00000801, not 0x00000803.
    write_raw(_images_path(tmp_path), idx_bytes(np.zeros(5, np.uint8)))
    with pytest.raises(DataError) as err:
        load_split(tmp_path, "train")
    msg = str(err.value)
    assert str(_images_path(tmp_path)) in msg
    assert "0x00000801" in msg and "0x00000803" in msg


def test_not_an_idx_file(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "junk", b"PK\x03\x04 this is a zip, not IDX")
    with pytest.raises(DataError, match=r"junk: bad IDX magic number 0x504B0304"):
        read_idx(path)


def test_images_of_the_wrong_size(tmp_path: Path) -> None:
    make_split(tmp_path)
    write_raw(_images_path(tmp_path), idx_bytes(np.zeros((5, 32, 32), np.uint8)))
    with pytest.raises(DataError, match=r"images are 32x32, expected 28x28") as err:
        load_split(tmp_path, "train")
    assert str(_images_path(tmp_path)) in str(err.value)


def test_images_with_the_wrong_number_of_dimensions(tmp_path: Path) -> None:
    make_split(tmp_path)
    raw = bytearray(idx_bytes(np.zeros((5, 28 * 28), np.uint8)))
    write_raw(_images_path(tmp_path), bytes(raw))
    with pytest.raises(DataError, match=r"magic number 0x00000802, expected 0x00000803"):
        load_split(tmp_path, "train")


def test_truncated_payload(tmp_path: Path) -> None:
    make_split(tmp_path)
    full = idx_bytes(np.zeros((5, 28, 28), np.uint8))
    write_raw(_images_path(tmp_path), full[:-100])
    with pytest.raises(DataError) as err:
        load_split(tmp_path, "train")
    msg = str(err.value)
    assert "truncated" in msg and "3920" in msg and "3820" in msg  # needs 5*784, found 3820
    assert str(_images_path(tmp_path)) in msg


def test_truncated_header(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "h", bytes([0, 0, 8, 3, 0, 0, 0, 5]))
    with pytest.raises(DataError, match=r"truncated IDX header: 3 dimensions need 16 bytes"):
        read_idx(path)


def test_trailing_bytes(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "t", idx_bytes(np.zeros(4, np.uint8)) + b"\0\0")
    with pytest.raises(DataError, match=r"trailing bytes.*needs 4 bytes.*found 6"):
        read_idx(path)


def test_truncated_gzip(tmp_path: Path) -> None:
    make_split(tmp_path)
    raw = _images_path(tmp_path).read_bytes()
    _images_path(tmp_path).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=r"corrupt or truncated gzip") as err:
        load_split(tmp_path, "train")
    assert str(_images_path(tmp_path)) in str(err.value)


def test_image_and_label_counts_disagree(tmp_path: Path) -> None:
    make_split(tmp_path, n=5)
    write_raw(_labels_path(tmp_path), idx_bytes(np.zeros(4, np.uint8)))
    with pytest.raises(DataError) as err:
        load_split(tmp_path, "train")
    msg = str(err.value)
    assert "5 images" in msg and "4 labels" in msg
    assert str(_images_path(tmp_path)) in msg and str(_labels_path(tmp_path)) in msg


def test_label_out_of_range(tmp_path: Path) -> None:
    make_split(tmp_path, n=5)
    write_raw(_labels_path(tmp_path), idx_bytes(np.array([0, 1, 12, 3, 4], np.uint8)))
    with pytest.raises(DataError, match=r"label 12 out of range 0\.\.9"):
        load_split(tmp_path, "train")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"IDX file not found: .*nope"):
        read_idx(tmp_path / "nope")


# --- dataset discovery -----------------------------------------------------------------------


@pytest.fixture
def no_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No $BNEXPORT_DATA and an empty default location."""
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    empty = tmp_path / "default"
    monkeypatch.setattr(data, "DEFAULT_DATA_DIR", empty)
    return empty


def test_missing_dataset_gives_the_install_hint(no_default: Path) -> None:
    with pytest.raises(DataError) as err:
        find_data_dir()
    msg = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "--data-dir" in msg and "$BNEXPORT_DATA" in msg and str(no_default) in msg


def test_explicit_dir_lacking_files_is_an_error_not_a_fallback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = tmp_path / "good"
    good.mkdir()
    make_split(good)
    monkeypatch.setattr(data, "DEFAULT_DATA_DIR", good)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as err:
        find_data_dir(empty)
    msg = str(err.value)
    assert str(empty) in msg and "train-images-idx3-ubyte[.gz]" in msg and INSTALL_HINT in msg


def test_search_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dirs = {}
    for name in ("explicit", "env", "default"):
        dirs[name] = tmp_path / name
        dirs[name].mkdir()
        make_split(dirs[name])
    monkeypatch.setattr(data, "DEFAULT_DATA_DIR", dirs["default"])
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    assert find_data_dir() == dirs["default"]
    monkeypatch.setenv(data.ENV_VAR, str(dirs["env"]))
    assert find_data_dir() == dirs["env"]
    assert find_data_dir(dirs["explicit"]) == dirs["explicit"]


def test_env_dir_lacking_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=r"\$BNEXPORT_DATA .*nowhere is not a directory"):
        find_data_dir()


def test_test_split_only(tmp_path: Path) -> None:
    make_split(tmp_path)
    (tmp_path / "train-images-idx3-ubyte.gz").unlink()
    assert find_data_dir(tmp_path, splits=("test",)) == tmp_path
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        find_data_dir(tmp_path)


# --- the bundled sample ----------------------------------------------------------------------


def test_sample_is_small_and_stratified() -> None:
    files = sorted(p for p in SAMPLE_DIR.iterdir() if p.suffix == ".gz")
    assert [p.name for p in files] == list(sorted(data.SAMPLE_FILES))
    assert sum(p.stat().st_size for p in SAMPLE_DIR.iterdir()) < 1_000_000
    images, labels = load_sample()
    assert images.shape == (1000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels, minlength=10).tolist() == [100] * 10
    assert (SAMPLE_DIR / "LICENSE.md").read_text().count("MIT") >= 1


@pytest.mark.dataset
@needs_dataset
def test_sample_is_the_first_100_test_images_of_each_class() -> None:
    test_images, test_labels = load_split(_system_data(), "test")
    picked = []
    for c in range(10):
        picked += [i for i, y in enumerate(test_labels.tolist()) if y == c][:100]
    picked.sort()
    images, labels = load_sample()
    np.testing.assert_array_equal(images, test_images[picked])
    np.testing.assert_array_equal(labels, test_labels[picked])


@pytest.mark.dataset
@needs_dataset
def test_make_sample_regenerates_the_shipped_files_bit_for_bit(tmp_path: Path) -> None:
    make_sample = runpy.run_path(str(REPO / "scripts" / "make_sample.py"))["make_sample"]
    written = make_sample(None, tmp_path)
    assert [p.name for p in written] == list(data.SAMPLE_FILES)
    for path in written:
        assert path.read_bytes() == (SAMPLE_DIR / path.name).read_bytes(), path.name


# --- Normalize and to_tensor -----------------------------------------------------------------


def test_to_tensor_formula_by_hand() -> None:
    norm = Normalize(mean=0.25, std=0.5)
    pixels = np.zeros((2, 28, 28), np.uint8)
    pixels[0, 0, 0], pixels[0, 0, 1], pixels[1, 27, 27] = 255, 128, 51
    x = to_tensor(pixels, norm)
    assert tuple(x.shape) == (2, 1, 28, 28) and str(x.dtype) == "torch.float32"
    assert x[0, 0, 0, 0].item() == pytest.approx((1.0 - 0.25) / 0.5)  # 1.5
    assert x[0, 0, 0, 1].item() == pytest.approx((128 / 255 - 0.25) / 0.5, rel=1e-6)
    assert x[1, 0, 27, 27].item() == pytest.approx((0.2 - 0.25) / 0.5, rel=1e-6)  # 51/255 = 0.2
    assert x[1, 0, 0, 0].item() == pytest.approx(-0.5)


def test_to_tensor_rejects_float_input() -> None:
    with pytest.raises(DataError, match="uint8"):
        to_tensor(np.zeros((1, 28, 28), np.float32))


def test_normalize_round_trip_and_validation() -> None:
    n = Normalize(0.3, 0.4)
    assert n.to_dict() == {"mean": 0.3, "std": 0.4}
    assert Normalize.from_dict(n.to_dict()) == n
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(DataError, match="std must be finite and > 0"):
            Normalize(0.0, bad)
    with pytest.raises(DataError, match="mean must be finite"):
        Normalize(float("nan"), 1.0)
    with pytest.raises(DataError, match="exactly the keys mean and std"):
        Normalize.from_dict({"mean": 0.1})
    with pytest.raises(DataError, match="must be a number"):
        Normalize.from_dict({"mean": "0.1", "std": 1.0})


@pytest.mark.dataset
@needs_dataset
def test_fashion_mnist_constants_match_the_training_pixels() -> None:
    images, _ = load_split(_system_data(), "train")
    counts = np.bincount(images.ravel(), minlength=256).astype(np.float64)
    values = np.arange(256) / 255.0
    mean = (counts * values).sum() / counts.sum()
    std = np.sqrt((counts * (values - mean) ** 2).sum() / counts.sum())
    assert FASHION_MNIST_NORMALIZE.mean == pytest.approx(mean, abs=1e-8)
    assert FASHION_MNIST_NORMALIZE.std == pytest.approx(std, abs=1e-8)


def test_data_module_imports_without_torch() -> None:
    code = "import sys, bnexport.data; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
