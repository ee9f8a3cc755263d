"""Which fold step broke: the folded and the unfolded graph compared value by value in float64.

Each fold step replaces a value of the unfolded graph (a BatchNorm chain's end, or the output of
the layer a BatchNorm was folded before) by one of the folded graph (`bnexport.fold.context.Probe`).
Both graphs run on the self-check's inputs in float64 — the folded one with the fold's exact
float64 parameters — and every pair is compared in execution order with the parity rule
(`bnexport.noise.NoiseTolerance`): the error of the folded value against the unfolded one, against
what float64 rounding explains there (the unfolded graph's own fp32 error at that value, and where
that alone fails, its sensitivity to ±eps changes of its inputs and parameters, × eps64/eps). The
first step that fails is the one that broke: every step after it inherits its error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from bnexport.fold.context import Probe
from bnexport.fold.verify import (
    SENSITIVITY_DRAWS,
    SENSITIVITY_SEED,
    clone_inputs,
    float64_inputs,
    lowest_precision,
    perturbed_forward,
    run_float64,
)
from bnexport.noise import NoiseTolerance, relative_error


@dataclass
class StepCheck:
    """One fold step compared: its error against the unfolded value, the floor and limit."""

    bn: str
    into: str
    error: float
    floor: float
    limit: float
    passed: bool
    key: str = ""  # the name the fold leaves unfolded when this step is excluded

    def ratio(self) -> float:
        """The error as a multiple of the floor."""
        return self.error / self.floor if self.floor else 0.0


@dataclass
class Localization:
    """Every fold step in execution order, and the first that fails (None: none does)."""

    steps: list[StepCheck] = field(default_factory=list)
    factor: float = 0.0

    @property
    def first_failing(self) -> StepCheck | None:
        return next((s for s in self.steps if not s.passed), None)

    def to_dict(self) -> dict[str, Any]:
        first = self.first_failing
        return {
            "rule": "noise",
            "factor": self.factor,
            "steps": [{k: v for k, v in asdict(s).items() if k != "key"} for s in self.steps],
            "first_failing": None if first is None else first.bn,
        }


class _Recorder(fx.Interpreter):
    """Runs a GraphModule and keeps the tensor values of the nodes named in ``names``."""

    def __init__(self, gm: fx.GraphModule, names: set[str]) -> None:
        super().__init__(gm)
        self.names = names
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.names and isinstance(out, torch.Tensor):
            self.values[n.name] = out.detach().clone()
        return out


class _Recording(nn.Module):
    """A module whose forward runs ``gm`` through a `_Recorder` (so `run_float64` can give it
    float64 parameters); ``values`` holds the last run's recorded values."""

    def __init__(self, gm: fx.GraphModule, names: set[str]) -> None:
        super().__init__()
        self.gm = gm
        self.names = names
        self.values: dict[str, torch.Tensor] = {}

    def forward(self, *args: Any) -> Any:
        recorder = _Recorder(self.gm, self.names)
        out = recorder.run(*args)
        self.values = recorder.values
        return out


def localize(
    reference: fx.GraphModule,
    folded: fx.GraphModule,
    probes: Sequence[Probe],
    inputs: Sequence[Any],
    exact: Mapping[str, torch.Tensor],
    memo64: dict[int, torch.Tensor] | None = None,
    rule: NoiseTolerance | None = None,
) -> Localization:
    """Compare every fold step (``probes``) of ``folded`` against the unfolded traced graph
    ``reference`` on ``inputs`` (the self-check's), in execution order (module docstring)."""
    rule = rule or NoiseTolerance()
    order = {n.name: k for k, n in enumerate(folded.graph.nodes)}
    probes = sorted((p for p in probes if p.folded in order), key=lambda p: order[p.folded])
    dtype = lowest_precision(reference)
    eps = float(torch.finfo(dtype).eps)
    rho = float(torch.finfo(torch.float64).eps) / eps
    memo = {} if memo64 is None else memo64
    xs64 = float64_inputs(inputs)
    ref = _Recording(reference, {p.reference for p in probes})
    run_float64(ref, xs64, memo=memo)
    truth = ref.values
    fold = _Recording(folded, {p.folded for p in probes})
    run_float64(fold, xs64, {f"gm.{k}": v for k, v in exact.items()}, memo)
    got = fold.values
    with torch.no_grad():
        ref(*clone_inputs(inputs))
    draw = ref.values
    errors = [_error(got.get(p.folded), truth.get(p.reference)) for p in probes]
    noise = [_error(draw.get(p.reference), truth.get(p.reference)) for p in probes]
    sens = [0.0] * len(probes)
    if not all(rule.passes(e, n, eps, rho) for e, n in zip(errors, noise, strict=True)):
        sens = _sensitivity(ref, probes, xs64, truth, eps, memo)
    steps = []
    for p, err, n, s in zip(probes, errors, noise, sens, strict=True):
        floor = max(n, s)
        steps.append(
            StepCheck(
                bn=p.key,
                into=p.into,
                error=err,
                floor=rule.floor(floor, eps) * rho,
                limit=rule.limit(floor, eps, rho),
                passed=rule.passes(err, floor, eps, rho),
                key=p.key,
            )
        )
    return Localization(steps, rule.factor)


def _error(got: torch.Tensor | None, truth: torch.Tensor | None) -> float:
    """Relative error of ``got`` against ``truth`` (infinite if either is missing or they
    differ in shape: the step changed what the graph computes)."""
    if got is None or truth is None or got.shape != truth.shape:
        return float("inf")
    if not truth.is_floating_point():
        return 0.0 if torch.equal(got, truth) else float("inf")
    return relative_error(got.double().numpy(), truth.numpy()).value


def _sensitivity(
    ref: _Recording,
    probes: Sequence[Probe],
    xs64: Sequence[Any],
    truth: Mapping[str, torch.Tensor],
    eps: float,
    memo: dict[int, torch.Tensor],
) -> list[float]:
    """Per step: how far the unfolded value moves under ±eps changes of every input, parameter
    and buffer (the largest of the seeded draws, as the self-check measures it)."""
    gen = torch.Generator().manual_seed(SENSITIVITY_SEED)
    worst = [0.0] * len(probes)
    for _ in range(SENSITIVITY_DRAWS):
        perturbed_forward(ref, xs64, eps, gen, memo)
        for k, p in enumerate(probes):
            worst[k] = max(worst[k], _error(ref.values.get(p.reference), truth.get(p.reference)))
    return worst
