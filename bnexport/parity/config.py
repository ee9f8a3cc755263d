"""What a parity check runs and how strictly (`CheckConfig`), and a check ready to run
(`PreparedCheck`): the types the stages of a check hand each other, in one module they all import.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bnexport.defaults import (
    DEFAULT_OPT_LEVELS,
    DEFAULT_PROVIDERS,
    DEFAULT_TOLERANCE_MODE,
    OPT_LEVELS,
    PROVIDER_CHOICES,
    TOLERANCE_MODES,
)
from bnexport.errors import ParityInputError
from bnexport.noise import NoiseTolerance
from bnexport.parity.inputs import InputConfig, ParityInputs
from bnexport.parity.tolerance import Tolerance, resolve_tolerances
from bnexport.runners import OnnxRuntimeRunner, Runner, TorchRunner
from bnexport.signature import TensorSpec

#: Nominal seconds of model forwards a default check aims at (`bnexport.parity.plan`: counted
#: from the model's FLOPs and op calls, never timed): the samples and the batch sizes shrink for a
#: model whose forward is expensive (resnet50 at 224×224 gets the core check).
DEFAULT_TIME_BUDGET_S = 6.0
CUDA_OPT_LEVEL = "all"
# Threads of a check: PyTorch keeps its own setting (all cores, or OMP_NUM_THREADS), and
# onnxruntime's CPU sessions use as many, without spinning: a deep model's check at 224×224 takes
# 1.4x less time on 2 cores than single-threaded. On a busy shared CPU, OpenMP's threads collapse
# (10-40x slower with 2 threads at load 10 on 2 cores): set OMP_NUM_THREADS=1 there (the tests do).
DEFAULT_TORCH_THREADS: int | None = None  # None: leave torch's setting alone
DEFAULT_ORT_THREADS: int | None = None  # None: torch's thread count; 0: onnxruntime's choice
DEFAULT_ORT_SPINNING = False
#: When a check localizes (`bnexport.parity.localize`): never, when a gating runner fails, always.
LOCALIZE_MODES: tuple[str, ...] = ("never", "on-failure", "always")


@dataclass(frozen=True)
class CheckConfig:
    """What to run and how strictly. CLI flags map one-to-one onto these fields.

    ``providers``: ``("auto",)`` = CPU, plus CUDA when the probe proves it runs (else the CUDA
    runners are listed as skipped with the reason); ``("cuda",)`` or ``("cpu", "cuda")`` demand
    CUDA (``ProviderUnavailableError`` when it does not run). ``tolerances`` override
    ``DEFAULT_TOLERANCES`` per runner kind. ``tf32_gate`` makes the CUDA-with-TF32 runner gate.
    ``folded``: run the BN-folded PyTorch model the caller passes as a candidate; it gates with
    ``folded_gating`` (`bnexport onnx`, which exports that fold), and is reported only without
    (`bnexport check`: the file is not necessarily that fold's export).
    """

    providers: tuple[str, ...] = DEFAULT_PROVIDERS
    opt_levels: tuple[str, ...] = DEFAULT_OPT_LEVELS
    batch_sizes: tuple[int, ...] | None = None  # None: adapt to the model's cost (plan_inputs)
    inputs: InputConfig = field(default_factory=InputConfig)
    samples: int | None = None  # random samples; None: inputs.random_count, fewer for slow models
    time_budget_s: float = DEFAULT_TIME_BUDGET_S
    save_inputs: Path | None = None
    tolerance_mode: str = DEFAULT_TOLERANCE_MODE
    noise_tolerance: NoiseTolerance = field(default_factory=NoiseTolerance)
    tolerances: Mapping[str, Tolerance] = field(default_factory=dict)
    tf32_gate: bool = False
    ground_truth: bool = True
    folded: bool = True
    folded_gating: bool = True  # False: the folded runner is reported, not gating (`check`)
    cuda_device_id: int = 0
    torch_threads: int | None = DEFAULT_TORCH_THREADS  # None: leave torch's setting alone
    ort_threads: int | None = DEFAULT_ORT_THREADS  # None: torch's count; 0: onnxruntime's
    ort_spinning: bool = DEFAULT_ORT_SPINNING
    localize: str = "never"  # one of LOCALIZE_MODES (bnexport.parity.localize)

    def __post_init__(self) -> None:
        self._check_runners()
        self._check_sizes()
        self._check_tolerances()
        if self.localize not in LOCALIZE_MODES:
            raise ParityInputError(
                f"localize {self.localize!r}: choose {', '.join(LOCALIZE_MODES)}"
            )

    def _check_runners(self) -> None:
        bad = [p for p in self.providers if p not in PROVIDER_CHOICES]
        if bad or not self.providers:
            raise ParityInputError(
                f"providers {list(self.providers)}: choose from cpu, cuda, cpu,cuda or auto"
            )
        if "auto" in self.providers and len(self.providers) > 1:
            raise ParityInputError("provider 'auto' cannot be combined with others")
        bad = [o for o in self.opt_levels if o not in OPT_LEVELS]
        if bad or not self.opt_levels:
            raise ParityInputError(
                f"optimization levels {list(self.opt_levels)}: choose from {', '.join(OPT_LEVELS)}"
            )

    def _check_sizes(self) -> None:
        if self.batch_sizes is not None and (
            not self.batch_sizes
            or any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in self.batch_sizes)
        ):
            raise ParityInputError(
                f"batch sizes {list(self.batch_sizes)} must be positive integers"
            )
        if self.samples is not None and self.samples < 0:
            raise ParityInputError(f"--samples {self.samples} must be >= 0")

    def _check_tolerances(self) -> None:
        if self.tolerance_mode not in TOLERANCE_MODES:
            raise ParityInputError(
                f"--tolerance {self.tolerance_mode!r}: choose {' or '.join(TOLERANCE_MODES)}"
            )
        if self.tolerance_mode == "noise" and not self.ground_truth:
            raise ParityInputError(
                "the noise-relative tolerance measures against the float64 truth: drop --no-fp64 "
                "or use --tolerance fixed"
            )
        if self.tolerance_mode == "noise" and self.tolerances:
            raise ParityInputError(
                "--rtol/--atol set fixed tolerances: add --tolerance fixed to use them"
            )
        resolve_tolerances(self.tolerances)  # validates the kinds

    def tolerance_for(self, kind: str) -> Tolerance | NoiseTolerance:
        """The tolerance that decides for a runner of ``kind``."""
        if self.tolerance_mode == "noise":
            return self.noise_tolerance
        return resolve_tolerances(self.tolerances)[kind]


@dataclass
class PreparedCheck:
    """One check, ready to run: what is compared, by which runners, on which inputs."""

    config: CheckConfig
    reference: Any
    reference_name: str
    model_info: dict[str, Any]
    weights: str
    notes: list[str]
    cuda_probe: dict[str, Any] | None
    use_cuda: bool
    skipped: list[dict[str, str]]
    in_specs: tuple[TensorSpec, ...]
    out_specs: tuple[TensorSpec, ...]
    ref_runner: TorchRunner
    gt_runner: TorchRunner | None  # the float64 truth
    torch_runners: list[TorchRunner]  # candidates run once, at the largest batch size
    ort_runners: list[OnnxRuntimeRunner]
    inputs: ParityInputs
    batch_sizes: tuple[int, ...]

    @property
    def candidates(self) -> list[Runner]:
        return [*self.torch_runners, *self.ort_runners]
