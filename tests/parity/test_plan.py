"""Input sizing (`bnexport.parity.plan`): what a default check sheds, step by step, for an
expensive model, sized on its counted cost (never on the clock); and that what the user fixed is
fed as asked."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
import torch

from bnexport.parity import CheckConfig
from bnexport.parity.inputs import CORE_EDGE_CASES, InputConfig, ParityInputs, build_inputs
from bnexport.parity.plan import (
    MIN_RANDOM_SAMPLES,
    build_sized_inputs,
    check_seconds,
    count_cost,
    plan_inputs,
)
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
# the model's cost: counted, never timed


class Wide(torch.nn.Module):
    """``x [N, 4] → Linear(4, width)``: ``2 · 4 · width`` FLOPs a sample, whatever the clock."""

    def __init__(self, width: int, sleep_s: float = 0.0) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, width)
        self.sleep_s = sleep_s
        self.calls: list[torch.dtype] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.dtype)
        time.sleep(self.sleep_s)
        return self.linear(x)


SPECS = [TensorSpec("x", (None, 4), np.dtype("float32"))]


def _sized(
    model: torch.nn.Module, config: CheckConfig, batch_sizes: tuple[int, ...] | None = None
) -> tuple[ParityInputs, tuple[int, ...], list[str]]:
    ref = TorchRunner(model, ["x"], ["y"])
    truth = TorchRunner(model, ["x"], ["y"], name="torch-fp64", dtype="float64")
    return build_sized_inputs(
        ref, SPECS, config, batch_sizes, None, (4,), n_ort=2, truth_runner=truth
    )


def _probe() -> ParityInputs:
    return build_inputs(SPECS, InputConfig(random_count=3, edge_cases=False), input_shape=(4,))


def test_the_cost_is_counted_flops_and_ops() -> None:
    cost = count_cost(TorchRunner(Wide(1000), ["x"], ["y"]), _probe())
    assert cost.counted
    assert cost.flops == 2 * 4 * 1000  # one sample's matrix product
    assert cost.ops >= 1 and cost.elements >= 1000


def test_a_model_the_counter_cannot_run_is_estimated_from_its_parameters() -> None:
    class Shy(Wide):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            from torch.utils._python_dispatch import _get_current_dispatch_mode

            if _get_current_dispatch_mode() is not None:
                raise RuntimeError("no modes here")
            return super().forward(x)

    cost = count_cost(TorchRunner(Shy(10), ["x"], ["y"]), _probe())
    assert not cost.counted and cost.flops == 2 * (4 * 10 + 10)
    assert cost.describe().startswith("~")


def _budget_for(samples: float, width: int) -> float:
    """The budget that fits ``samples`` samples of `Wide(width)` (two ORT runners, 1,7,64)."""
    cost = count_cost(TorchRunner(Wide(width), ["x"], ["y"]), _probe())
    return samples * check_seconds(cost, (1, 7, 64), n_ort=2, truth=True)


def test_an_expensive_model_keeps_the_core_edge_cases_and_says_why() -> None:
    config = CheckConfig(time_budget_s=_budget_for(3.5, 100_000))
    inputs, batch_sizes, notes = _sized(Wide(100_000), config)
    names = [s.name for s in inputs.sets]
    assert [n for n in names if n != "random"] == list(CORE_EDGE_CASES)
    assert inputs.size == 3  # the 2 core edge cases and 1 random sample
    assert batch_sizes == (1, 7)
    (note,) = notes
    assert re.fullmatch(
        r"plan: 1 of 64 random, 2 of 6 edge cases \(0\.0008 GFLOP a sample; budget \S+ s; "
        r"--samples N\)",
        note,
    )
    assert len("note: " + note) <= 100
    assert inputs.summary()["plan"]["cost"]["flops"] == 2 * 4 * 100_000


def test_a_cheap_model_gets_everything_and_the_report_says_so() -> None:
    inputs, batch_sizes, notes = _sized(Wide(8), CheckConfig())
    assert inputs.size == 64 + 6
    assert batch_sizes == (1, 7, 64)
    assert notes == ["plan: all 70 samples (6.4e-08 GFLOP a sample; budget 6 s; --samples N)"]


def test_the_plan_does_not_depend_on_the_clock() -> None:
    config = CheckConfig(time_budget_s=_budget_for(20, 10_000))
    fast, _, fast_notes = _sized(Wide(10_000), config)
    slow, _, slow_notes = _sized(Wide(10_000, sleep_s=0.05), config)
    assert fast.size == slow.size and 6 < fast.size < 70
    assert fast_notes == slow_notes
    for name, arr in fast.arrays().items():
        np.testing.assert_array_equal(arr, slow.arrays()[name])


def test_samples_asked_for_are_fed_with_every_edge_case() -> None:
    config = CheckConfig(time_budget_s=_budget_for(3.5, 100_000), samples=3)
    inputs, _, notes = _sized(Wide(100_000), config)
    assert inputs.size == 3 + 6
    assert notes == []


def test_edge_cases_off_never_sheds_below_the_random_floor() -> None:
    config = CheckConfig(time_budget_s=1e-9, inputs=InputConfig(edge_cases=False))
    inputs, _, _ = _sized(Wide(100), config)
    assert inputs.size == MIN_RANDOM_SAMPLES


def test_a_reference_that_fails_is_bad_input() -> None:
    class Broken(Wide):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("boom")

    from bnexport.errors import ParityInputError

    with pytest.raises(ParityInputError, match=r"torch-fp32.*boom"):
        _sized(Broken(4), CheckConfig())


def test_the_float64_truth_is_not_run_to_plan() -> None:
    model = Wide(8)
    _sized(model, CheckConfig())
    assert torch.float64 not in model.calls
