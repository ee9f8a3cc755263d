"""Per-layer comparison: module outputs of the unfolded PyTorch model (forward hooks, fp32 and the
float64 truth) against the same values of the exported graph (marked as outputs of a copy, run by
onnxruntime as the failing runner ran), each layer under its own noise floor.

The comparison is the parity engine's (`bnexport.parity.engine`): a layer is one more named
output, measured with `measure_baseline` (fp32 at the check's batch size and at batch 1, the
reordered-sums draw, the float64 truth) and `compare_outputs`; nothing here measures an error.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bnexport.parity.compare import OutputComparison
from bnexport.parity.engine import compare_outputs, measure_baseline, run_reference
from bnexport.parity.inputs import ParityInputs
from bnexport.runners import Feed, OnnxRuntimeRunner, Runner, TorchRunner

if TYPE_CHECKING:
    import numpy as np

    from bnexport.noise import NoiseTolerance
    from bnexport.ort import SessionConfig
    from bnexport.parity.tolerance import Tolerance

#: The prefix of a layer key that stands for one of the model's outputs.
OUTPUT_PREFIX = "output:"


def call_key(module: str, call: int) -> str:
    """``module`` for its first call, ``module@k`` for call k (0-based) after that."""
    return module if call == 0 else f"{module}@{call}"


@dataclass(frozen=True)
class Call:
    """One call of a module in the unfolded model's forward, in the order the calls returned."""

    module: str
    call: int
    kind: str  # the module's class name
    order: int
    shape: tuple[int, ...]  # per sample (the batch axis left out); () for a non-tensor output
    dtype: str
    identity: bool = False  # returned its input tensor object (an eval identity, or in place)

    @property
    def key(self) -> str:
        return call_key(self.module, self.call)


@dataclass
class Layer:
    """A module call whose output is a value of the exported graph (or a model output)."""

    key: str
    module: str
    call: int
    kind: str
    value: str
    order: int  # execution order in the unfolded model (outputs last)
    position: int  # where the graph computes the value
    size: int  # elements per sample
    aliases: list[str] = field(default_factory=list)  # other calls that return this value
    chain: str | None = None  # the fold chain the layer ends or belongs to
    nodes: list[str] = field(default_factory=list)  # the ONNX nodes that compute it
    cut: bool = False
    output: str | None = None  # the model output's name, for an output layer

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.key,
            "module": self.module,
            "call": self.call,
            "type": self.kind,
            "onnx_value": self.value,
            "onnx_nodes": list(self.nodes),
            "aliases": list(self.aliases),
            "fold_chain": self.chain,
            "cut": self.cut,
        }


class _Stop(Exception):
    """Raised by a hook once every wanted call has returned: the rest of the forward is skipped."""


@contextmanager
def hooked(model: Any, on_call: Callable[[str, int, Any, Any], bool]) -> Iterator[None]:
    """Forward hooks on every submodule of ``model``: ``on_call(path, call index, output, inputs)``
    after each call; when it returns True the forward stops (`_Stop`, swallowed by the caller)."""
    counts: dict[str, int] = {}
    handles = []

    def hook_for(path: str) -> Callable[..., None]:
        def hook(_module: Any, args: Any, output: Any) -> None:
            k = counts.get(path, 0)
            counts[path] = k + 1
            if on_call(path, k, output, args):
                raise _Stop

        return hook

    for path, module in model.named_modules():
        if path:
            handles.append(module.register_forward_hook(hook_for(path)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def record_calls(
    runner: TorchRunner, feed: Feed, keep: set[str]
) -> tuple[list[Call], dict[str, np.ndarray]]:
    """Every module call of one forward of ``runner`` on ``feed``, and the outputs of the calls
    whose key is in ``keep``."""
    calls: list[Call] = []
    kept: dict[str, np.ndarray] = {}
    modules = dict(runner.model.named_modules())

    def on_call(path: str, k: int, output: Any, args: Any) -> bool:
        tensor = _tensor(output)
        shape = tuple(tensor.shape[1:]) if tensor is not None and tensor.dim() else ()
        dtype = str(tensor.dtype).removeprefix("torch.") if tensor is not None else ""
        same = tensor is not None and any(a is tensor for a in args)
        kind = type(modules[path]).__name__
        calls.append(Call(path, k, kind, len(calls), shape, dtype, same))
        if tensor is not None and call_key(path, k) in keep:
            kept[call_key(path, k)] = tensor.detach().clone().cpu().numpy()
        return False

    with hooked(runner.model, on_call):
        runner.infer(feed)
    return calls, kept


def _tensor(output: Any) -> Any:
    """``output`` if it is a tensor (a module returning a tuple or dict has no single output)."""
    import torch

    return output if isinstance(output, torch.Tensor) else None


class HookedRunner(Runner):
    """A PyTorch runner whose outputs are module calls' outputs (``wanted``: call key → layer
    key) and, for output layers, the model's own outputs (``outputs``: layer key → output name).
    Copies each output as it returns (a later in-place op must not change it) and stops the
    forward once everything wanted has returned, unless a model output is wanted."""

    def __init__(
        self, runner: TorchRunner, wanted: Mapping[str, str], outputs: Mapping[str, str]
    ) -> None:
        self.runner = runner
        self.wanted = dict(wanted)
        self.outputs = dict(outputs)
        self.name = runner.name
        self.kind = runner.kind
        self.gating = runner.gating
        self.description = f"{runner.description}, module outputs by forward hooks"
        self.model = runner.model

    def infer(self, feed: Feed) -> dict[str, np.ndarray]:
        got: dict[str, np.ndarray] = {}

        def on_call(path: str, k: int, output: Any, _args: Any) -> bool:
            layer = self.wanted.get(call_key(path, k))
            tensor = _tensor(output)
            if layer is not None and tensor is not None:
                got[layer] = tensor.detach().clone().cpu().numpy()
            return not self.outputs and len(got) == len(self.wanted)

        out: dict[str, np.ndarray] = {}
        with hooked(self.runner.model, on_call), suppress(_Stop):
            out = self.runner.infer(feed)
        for layer, name in self.outputs.items():
            got[layer] = out[name]
        return got


class MarkedRunner(Runner):
    """onnxruntime on a copy of the model with layer values marked as outputs (``values``: layer
    key → ONNX value), configured as the runner it stands in for (provider, level, threads)."""

    def __init__(
        self, model: bytes, config: SessionConfig, values: Mapping[str, str], like: Runner
    ) -> None:
        self.session_runner = OnnxRuntimeRunner(model, config, name=like.name, kind=like.kind)
        self.values = dict(values)
        self.name = like.name
        self.kind = like.kind
        self.gating = like.gating
        self.description = f"{like.description}, layer values marked as outputs"

    def infer(self, feed: Feed) -> dict[str, np.ndarray]:
        out = self.session_runner.infer(feed)
        return {layer: out[value] for layer, value in self.values.items()}


@dataclass
class LayerResult:
    """One layer's comparison (its error, noise floor and limit), and the round it was measured
    in (0-based)."""

    layer: Layer
    comparison: OutputComparison
    round: int

    @property
    def passed(self) -> bool:
        return self.comparison.passed

    def to_dict(self) -> dict[str, Any]:
        from bnexport.parity.compare import finite_or_str

        c = self.comparison
        ratio = c.noise_ratio
        budget = c.limit
        return {
            **self.layer.to_dict(),
            "error": None if c.error is None else finite_or_str(c.error),
            "noise_floor": c.floor,
            "budget": budget,
            "ratio": None if ratio is None else finite_or_str(ratio),
            "max_abs_err": finite_or_str(c.max_abs_err),
            "verdict": "pass" if c.passed else "fail",
            "worst": c.worst.to_dict() if c.worst else None,
            "round": self.round,
        }


@dataclass
class RoundSetup:
    """What every round of one localization shares: the check's runners, inputs and rule."""

    reference: TorchRunner
    truth: TorchRunner | None
    candidate: Runner  # the runner that failed (its name, kind and description)
    config: SessionConfig
    inputs: ParityInputs
    ref_batch: int
    batch: int
    tolerance: Tolerance | NoiseTolerance
    noise_runner: Callable[[Runner], Runner] | None = None  # the reordered-sums draw


def compare_layers(
    setup: RoundSetup, proto_bytes: Callable[[Sequence[str]], bytes], layers: Sequence[Layer]
) -> tuple[dict[str, OutputComparison], float]:
    """``layers`` compared in one round: one session of the marked copy, the hooked reference
    (and its draws), the hooked truth; returns each layer's comparison and the round's seconds."""
    started = time.perf_counter()
    wanted = {call_key(x.module, x.call): x.key for x in layers if x.output is None}
    outputs = {x.key: x.output for x in layers if x.output is not None}
    ref = HookedRunner(setup.reference, wanted, outputs)
    truth = None if setup.truth is None else HookedRunner(setup.truth, wanted, outputs)
    draws = [setup.noise_runner(ref)] if setup.noise_runner and truth is not None else []
    base = measure_baseline(
        ref, setup.inputs, setup.ref_batch, truth=truth, noise_batches=(1,), noise_runners=draws
    )
    marked = MarkedRunner(
        proto_bytes([x.value for x in layers]),
        setup.config,
        {x.key: x.value for x in layers},
        setup.candidate,
    )
    out = run_reference(marked, setup.inputs, setup.batch, fail=None)
    comparisons, _ = compare_outputs(marked, out, base, setup.inputs, setup.tolerance)
    return {c.name: c for c in comparisons}, time.perf_counter() - started
