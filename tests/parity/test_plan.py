"""Input sizing (`bnexport.parity.plan`): what a default check sheds, step by step, for a slow
model; and that what the user fixed is fed as asked."""

from __future__ import annotations

import re
import time
from typing import ClassVar

import numpy as np
import pytest
import torch

from bnexport.parity import CheckConfig
from bnexport.parity.inputs import CORE_EDGE_CASES, InputConfig, ParityInputs
from bnexport.parity.plan import MIN_RANDOM_SAMPLES, build_sized_inputs, plan_inputs
from bnexport.runners import TorchRunner
from bnexport.signature import TensorSpec

# --------------------------------------------------------------------------------------------
# plan_inputs: the arithmetic (1 s per sample, so the budget is the number of samples that fit)


def test_everything_fits() -> None:
    plan = plan_inputs(1.0, 6, random_count=10, core_samples=2, budget_s=16.0)
    assert (plan.random, plan.core_edge_cases_only, plan.all_batch_sizes) == (10, False, True)


def test_random_samples_shrink_first() -> None:
    plan = plan_inputs(1.0, 6, random_count=10, core_samples=2, budget_s=15.9)
    assert (plan.random, plan.core_edge_cases_only, plan.all_batch_sizes) == (9, False, False)


def test_every_edge_case_while_the_random_floor_fits() -> None:
    fits = 6 + MIN_RANDOM_SAMPLES
    plan = plan_inputs(1.0, 6, random_count=10, core_samples=2, budget_s=float(fits))
    assert (plan.random, plan.core_edge_cases_only) == (MIN_RANDOM_SAMPLES, False)


def test_then_the_core_check() -> None:
    fits = 6 + MIN_RANDOM_SAMPLES - 1
    plan = plan_inputs(1.0, 6, random_count=10, core_samples=2, budget_s=float(fits))
    assert (plan.random, plan.core_edge_cases_only) == (MIN_RANDOM_SAMPLES, True)


def test_the_core_check_down_to_one_random_sample() -> None:
    plan = plan_inputs(1.0, 6, random_count=10, core_samples=2, budget_s=2 + MIN_RANDOM_SAMPLES - 1)
    assert (plan.random, plan.core_edge_cases_only) == (1, True)
    plan = plan_inputs(1.0, 6, random_count=10, core_samples=2, budget_s=0.5)
    assert (plan.random, plan.core_edge_cases_only) == (1, True)


def test_edge_cases_fixed_by_the_user_are_kept() -> None:
    plan = plan_inputs(1.0, 6, random_count=10, core_samples=None, budget_s=0.5)
    assert (plan.random, plan.core_edge_cases_only) == (MIN_RANDOM_SAMPLES, False)


def test_no_random_samples_asked_stays_none() -> None:
    plan = plan_inputs(1.0, 6, random_count=0, core_samples=2, budget_s=0.5)
    assert plan.random == 0


# --------------------------------------------------------------------------------------------
# build_sized_inputs on a model that is slow on purpose


class Slow(torch.nn.Module):
    """Sleeps ``seconds`` per sample (in either dtype): the cost the plan measures."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds * x.shape[0])
        return x.flatten(1) * self.scale


SPECS = [TensorSpec("x", (None, 4), np.dtype("float32"))]


def _runners(model: torch.nn.Module) -> tuple[TorchRunner, TorchRunner]:
    ref = TorchRunner(model, ["x"], ["y"])
    truth = TorchRunner(model, ["x"], ["y"], name="torch-fp64", dtype="float64")
    return ref, truth


def _sized(
    model: torch.nn.Module, config: CheckConfig, batch_sizes: tuple[int, ...] | None = None
) -> tuple[ParityInputs, tuple[int, ...], list[str]]:
    ref, truth = _runners(model)
    return build_sized_inputs(
        ref, SPECS, config, batch_sizes, None, (4,), n_ort=2, truth_runner=truth
    )


def test_a_slow_model_keeps_the_core_edge_cases_and_says_so() -> None:
    # 10 ms a sample in fp32 and float64: (3 + 2 runners × 3 batch sizes) × 10 + 10 = 0.1 s per
    # sample fed, so a 0.35 s budget has room for 3: the 2 core edge cases and 1 random sample.
    config = CheckConfig(time_budget_s=0.35)
    inputs, batch_sizes, notes = _sized(Slow(0.01), config)
    names = [s.name for s in inputs.sets]
    assert [n for n in names if n != "random"] == list(CORE_EDGE_CASES)
    assert inputs.size == 3
    assert batch_sizes == (1, 7)
    (note,) = notes
    assert re.fullmatch(
        r"random samples 1 of 64, edge cases 2 of 6 \(forward 1\d ms, budget 0\.35 s; "
        r"--samples N overrides\)",
        note,
    )


def test_a_fast_model_gets_everything() -> None:
    inputs, batch_sizes, notes = _sized(Slow(0.0), CheckConfig())
    assert inputs.size == 64 + 6
    assert batch_sizes == (1, 7, 64)
    assert notes == []


def test_samples_asked_for_are_fed_with_every_edge_case() -> None:
    config = CheckConfig(time_budget_s=0.35, samples=3)
    inputs, _, notes = _sized(Slow(0.01), config)
    assert inputs.size == 3 + 6
    assert notes == []


def test_edge_cases_off_never_sheds_below_the_random_floor() -> None:
    config = CheckConfig(time_budget_s=0.01, inputs=InputConfig(edge_cases=False))
    inputs, _, _ = _sized(Slow(0.01), config)
    assert inputs.size == MIN_RANDOM_SAMPLES


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_reference_that_fails_is_bad_input(dtype: str) -> None:
    class Broken(Slow):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.dtype == getattr(torch, dtype):
                raise RuntimeError("boom")
            return super().forward(x)

    from bnexport.errors import ParityInputError

    # slow enough that the float64 truth is timed too
    with pytest.raises(ParityInputError, match=f"torch-fp{dtype[-2:]}.*boom"):
        _sized(Broken(0.01), CheckConfig(time_budget_s=0.35))


def test_a_cheap_model_is_not_timed_in_float64() -> None:
    class Counting(Slow):
        calls: ClassVar[list[torch.dtype]] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls.append(x.dtype)
            return super().forward(x)

    model = Counting(0.0)
    _sized(model, CheckConfig())
    assert torch.float64 not in model.calls
