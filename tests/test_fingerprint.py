"""The weights fingerprint against a from-scratch implementation of its documented definition, and
the verdicts `verify_weights` gives `bnexport check` (match, no fingerprint, mismatch, unseeded)."""

from __future__ import annotations

import copy
import hashlib

import numpy as np
import pytest
import torch
from torch import nn

from bnexport.errors import WeightsMismatchError
from bnexport.fingerprint import METADATA_KEY, SOURCE_KEY, verify_weights, weights_sha256


def _by_the_docs(model: nn.Module) -> str:
    """sorted names; per tensor ``name\\0dtype\\0shape\\0`` then its little-endian bytes."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        shape = ",".join(str(d) for d in t.shape)
        h.update(f"{name}\0{t.dtype}\0{shape}\0".encode())
        h.update(np.ascontiguousarray(t.detach().cpu().numpy()).tobytes())
    return h.hexdigest()


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))


def test_matches_the_documented_definition() -> None:
    model = _model()
    assert weights_sha256(model) == _by_the_docs(model)  # includes num_batches_tracked (int64)
    m64 = copy.deepcopy(model).double()
    assert weights_sha256(m64) == _by_the_docs(m64) != _by_the_docs(model)  # dtype is part of it


def test_one_ulp_changes_it_and_modes_or_copies_do_not() -> None:
    model = _model()
    digest = weights_sha256(model)
    assert weights_sha256(copy.deepcopy(model).train()) == digest
    with torch.no_grad():
        w = model[0].weight
        w[0, 0, 0, 0] = torch.nextafter(w[0, 0, 0, 0], torch.tensor(np.inf))
    assert weights_sha256(model) != digest


def test_a_bfloat16_model_hashes() -> None:
    assert len(weights_sha256(_model().to(torch.bfloat16))) == 64


def test_verdicts() -> None:
    model = _model()
    digest = weights_sha256(model)
    assert verify_weights({METADATA_KEY: digest}, model) == (digest, [])
    got, notes = verify_weights({}, model)
    assert got == digest and "records no weights_sha256" in notes[0]
    other = {METADATA_KEY: weights_sha256(_model(seed=1))}
    with pytest.raises(
        WeightsMismatchError,
        match=r"^this ONNX was exported from weights [0-9a-f]{12}, "
        rf"the reference has {digest[:12]}: the file comes from another model or checkpoint$",
    ):
        verify_weights(other, model)


def test_another_model_is_named_by_the_source_the_file_records() -> None:
    model = _model()
    other = {METADATA_KEY: weights_sha256(_model(seed=1)), SOURCE_KEY: "pkg:resnet"}
    with pytest.raises(
        WeightsMismatchError,
        match=r"the file records it was exported from pkg:resnet, the reference is another model "
        r"\(pkg:mobilenet\); check it against pkg:resnet$",
    ):
        verify_weights(other, model, rebuild=_model, name="pkg:mobilenet")
    with pytest.raises(WeightsMismatchError, match=r"exported from pkg:resnet too, whose weights"):
        verify_weights(other, model, rebuild=_model, name="pkg:resnet")


def test_an_unseeded_factory_is_named() -> None:
    model = _model()
    seeds = iter(range(1, 10))
    with pytest.raises(
        WeightsMismatchError,
        match=r"the factory pkg:build returns different weights on each call \(.*\): seed it",
    ):
        verify_weights(
            {METADATA_KEY: "0" * 64}, model, rebuild=lambda: _model(next(seeds)), name="pkg:build"
        )
    with pytest.raises(WeightsMismatchError, match="returns the same weights on each call"):
        verify_weights({METADATA_KEY: "0" * 64}, model, rebuild=_model, name="pkg:build")
    _, notes = verify_weights({}, model, rebuild=lambda: _model(next(seeds)), name="pkg:build")
    assert "pkg:build returns different weights on each call" in notes[1]
