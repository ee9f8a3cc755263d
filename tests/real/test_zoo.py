"""The real-model zoo itself: seeded, realistic and runnable, so the tests on it mean something.

A factory that returns different weights on two calls would make every comparison against "the
original model" compare two different models; BatchNorms left at their defaults (γ=1, β=0, μ=0,
σ²=1) would make any fold look exact.
"""

from __future__ import annotations

import pytest
import torch
from real.zoo import NO_BATCHNORM, REAL_MODELS, UNSEEN_MODELS, batchnorm_modules, requirement
from torch.utils._pytree import tree_leaves

pytestmark = pytest.mark.real


def _build(name: str) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    needs = requirement(name)
    if needs:
        pytest.importorskip(needs)
    return REAL_MODELS[name]()


@pytest.mark.parametrize("name", list(REAL_MODELS))
def test_factory_is_deterministic_and_realistic(name: str) -> None:
    rng_before = torch.get_rng_state()
    model, inputs = _build(name)
    assert torch.equal(torch.get_rng_state(), rng_before), "the factory moved the global RNG"
    again, inputs_again = _build(name)

    state, state_again = model.state_dict(), again.state_dict()
    assert list(state) == list(state_again)
    differ = [k for k in state if not torch.equal(state[k], state_again[k])]
    assert not differ, f"two calls of the factory differ in {differ[:5]}"
    assert all(torch.equal(a, b) for a, b in zip(inputs, inputs_again, strict=True))

    assert not model.training
    bns = list(batchnorm_modules(model))
    assert bool(bns) != (name in NO_BATCHNORM), "BatchNorms found where none are listed, or none"
    for path, bn in bns:
        assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var)), path
        assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean)), path
        assert bn.weight is None or bool(((bn.weight >= 0.5) & (bn.weight <= 1.5)).all()), path

    with torch.no_grad():
        outputs = [t for t in tree_leaves(model(*inputs)) if isinstance(t, torch.Tensor)]
    assert outputs and all(bool(torch.isfinite(t).all()) for t in outputs)
    assert all(t.shape[0] == inputs[0].shape[0] for t in outputs)


def test_the_unseen_models_are_in_the_zoo() -> None:
    assert len(UNSEEN_MODELS) == len(set(UNSEEN_MODELS)) == 28
    assert set(UNSEEN_MODELS) <= set(REAL_MODELS)
