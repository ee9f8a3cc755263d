"""What the check feeds: bundled images, seeded random, edge cases, and exact save/load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bnexport.data import FASHION_MNIST_NORMALIZE, load_sample
from bnexport.errors import ParityInputError
from bnexport.parity.inputs import (
    EDGE_LARGE,
    InputConfig,
    TensorSpec,
    build_inputs,
    load_inputs,
    save_inputs,
)

IMAGE = (TensorSpec("input", (None, 1, 28, 28), np.dtype(np.float32)),)
NORM = FASHION_MNIST_NORMALIZE


def test_default_inputs_are_bundled_random_and_edge_cases() -> None:
    inputs = build_inputs(IMAGE, InputConfig(), normalize=NORM)
    names = [s.name for s in inputs.sets]
    assert names[:2] == ["bundled", "random"]
    assert {"zeros", "black", "white", "gray", "large+", "large-", "large±"} <= set(names)
    x = inputs.arrays()["input"]
    assert x.dtype == np.float32 and x.shape == (inputs.size, 1, 28, 28)
    images, _ = load_sample()
    expected = ((images.astype(np.float64) / 255.0 - NORM.mean) / NORM.std).astype(np.float32)
    np.testing.assert_allclose(x[:1000, 0], expected, rtol=0, atol=1e-6)
    assert inputs.locate(1000) == ("random", 0)
    black = dict(zip(names, inputs.sets, strict=True))["black"].arrays["input"]
    assert np.allclose(black, -NORM.mean / NORM.std)
    assert dict(zip(names, inputs.sets, strict=True))["large-"].arrays["input"].max() == -EDGE_LARGE


def test_random_inputs_follow_the_seed() -> None:
    cfg = InputConfig(bundled=False, edge_cases=False, random_count=8, seed=3)
    a = build_inputs(IMAGE, cfg, normalize=NORM).arrays()["input"]
    b = build_inputs(IMAGE, cfg, normalize=NORM).arrays()["input"]
    c = build_inputs(
        IMAGE, InputConfig(bundled=False, edge_cases=False, random_count=8, seed=4), normalize=NORM
    ).arrays()["input"]
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_batches_cover_every_sample_once() -> None:
    inputs = build_inputs(IMAGE, InputConfig(bundled=False, random_count=20), normalize=NORM)
    chunks = [b["input"] for b in inputs.batches(7)]
    assert [len(c) for c in chunks[:-1]] == [7] * (len(chunks) - 1)
    assert np.array_equal(np.concatenate(chunks), inputs.arrays()["input"])


def test_a_fixed_batch_pads_the_last_batch_with_its_last_sample() -> None:
    inputs = build_inputs(IMAGE, InputConfig(random_count=10, edge_cases=False), normalize=NORM)
    inputs.pad_batches = True
    chunks = list(inputs.batches(64))
    assert [len(c["input"]) for c in chunks[:-1]] == [64] * (len(chunks) - 1)
    last = chunks[-1]["input"]
    real = inputs.size - 64 * (len(chunks) - 1)
    assert len(last) == 64 and real < 64
    np.testing.assert_array_equal(last[:real], inputs.arrays()["input"][-real:])
    assert (last[real:] == last[real - 1]).all()


def test_save_then_load_is_bit_identical(tmp_path: Path) -> None:
    inputs = build_inputs(IMAGE, InputConfig(random_count=5), normalize=NORM)
    path = tmp_path / "fed.npz"
    save_inputs(inputs, path)
    again = load_inputs(path, IMAGE)
    assert again.arrays()["input"].tobytes() == inputs.arrays()["input"].tobytes()
    assert [(s.name, s.size) for s in again.sets] == [(s.name, s.size) for s in inputs.sets]
    assert build_inputs(IMAGE, InputConfig(inputs_file=path)).size == inputs.size


def test_a_plain_npz_keyed_by_input_name_loads(tmp_path: Path) -> None:
    path = tmp_path / "mine.npz"
    np.savez(path, input=np.ones((3, 1, 28, 28), np.float32))
    inputs = load_inputs(path, IMAGE)
    assert inputs.size == 3 and inputs.locate(2) == ("file", 2)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.ones((2, 1, 28, 28), np.float32)}, "ONNX model's inputs are"),
        ({"input": np.ones((2, 1, 28, 28), np.float64)}, "no silent casts"),
        ({"input": np.ones((2, 3, 28, 28), np.float32)}, "has shape"),
    ],
)
def test_bad_inputs_files_are_clear_errors(tmp_path: Path, arrays: dict, message: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ParityInputError, match=message):
        load_inputs(path, IMAGE)


def test_non_image_models_get_random_and_edge_inputs_and_no_note() -> None:
    """A --model source gets seeded random inputs and edge cases, silently; asking for the
    bundled images explicitly says why they are not used."""
    spec = (TensorSpec("x", (None, 3, 8, 8), np.dtype(np.float32)),)
    inputs = build_inputs(spec, InputConfig(random_count=4), normalize=None)
    assert inputs.sets[0].name == "random" and inputs.notes == []
    assert [s.name for s in inputs.sets][1:] == [
        "zeros",
        "ones",
        "minus-ones",
        "large+",
        "large-",
        "large±",
    ]
    asked = build_inputs(spec, InputConfig(random_count=4, bundled=True), normalize=None)
    assert "bundled images not used" in asked.notes[0]
    with pytest.raises(ParityInputError, match="cannot feed IDX images"):
        build_inputs(spec, InputConfig(data_dir=Path("/nonexistent")))


def test_symbolic_dims_need_an_input_shape() -> None:
    spec = (TensorSpec("x", (None, 3, None, None), np.dtype(np.float32)),)
    with pytest.raises(ParityInputError, match="--input-shape"):
        build_inputs(spec, InputConfig(bundled=False))
    inputs = build_inputs(
        spec, InputConfig(random_count=2, edge_cases=False), input_shape=(3, 5, 5)
    )
    assert inputs.arrays()["x"].shape == (2, 3, 5, 5)
    with pytest.raises(ParityInputError, match="does not fit"):
        build_inputs(spec, InputConfig(), input_shape=(1, 5, 5))


def test_integer_and_bool_inputs_are_generated_in_range() -> None:
    from bnexport.defaults import INT_INPUT_HIGH

    specs = (
        TensorSpec("image", (None, 3, 4, 4), np.dtype(np.float32)),
        TensorSpec("ids", (None, 6), np.dtype(np.int64)),
        TensorSpec("mask", (None, 6), np.dtype(np.bool_)),
    )
    inputs = build_inputs(specs, InputConfig(random_count=50), normalize=NORM)
    arrays = inputs.arrays()
    assert [a.dtype for a in arrays.values()] == [np.float32, np.int64, np.bool_]
    ids = arrays["ids"]
    assert ids.min() == 0 and ids.max() == INT_INPUT_HIGH - 1  # the whole range, nothing outside
    sets = {s.name: s.arrays for s in inputs.sets}
    assert (sets["zeros"]["ids"] == 0).all() and (sets["large+"]["ids"] == INT_INPUT_HIGH - 1).all()
    assert (sets["large-"]["ids"] == 0).all() and sets["large+"]["mask"].all()
    assert sets["large+"]["image"].min() == EDGE_LARGE  # floats keep their edge values
    assert inputs.notes == []


def test_several_inputs_save_and_load_exactly(tmp_path: Path) -> None:
    specs = (
        TensorSpec("image", (None, 2, 3), np.dtype(np.float32)),
        TensorSpec("ids", (None, 4), np.dtype(np.int32)),
    )
    inputs = build_inputs(specs, InputConfig(random_count=5), normalize=None)
    save_inputs(inputs, tmp_path / "fed.npz")
    again = load_inputs(tmp_path / "fed.npz", specs)
    for name in ("image", "ids"):
        np.testing.assert_array_equal(again.arrays()[name], inputs.arrays()[name])
    assert [s.name for s in again.sets] == [s.name for s in inputs.sets]


def test_input_shapes_are_given_one_per_input() -> None:
    specs = (
        TensorSpec("a", (None, None), np.dtype(np.float32)),
        TensorSpec("b", (None, 3), np.dtype(np.float32)),
    )
    inputs = build_inputs(specs, InputConfig(random_count=2), input_shape=[(7,), (3,)])
    assert inputs.arrays()["a"].shape[1:] == (7,)
    with pytest.raises(ParityInputError, match=r"2 input.*but 1 input shape"):
        build_inputs(specs, InputConfig(), input_shape=(7,))
    with pytest.raises(ParityInputError, match=r"does not fit .* \[N,4\]"):
        build_inputs(specs, InputConfig(), input_shape=[(7,), (4,)])
