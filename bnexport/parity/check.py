"""The parity check itself: `CheckConfig` and `check_parity`, which runs the stages in order.

Open the ONNX model and check the reference's weights against its fingerprint; build the
onnxruntime runners (CPU at each optimization level, CUDA when it runs); size the inputs
(:mod:`bnexport.parity.plan`); run the reference, the truth and each candidate, and compare them
(:mod:`bnexport.parity.run`); gather the `ParityReport`.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bnexport.defaults import (
    DEFAULT_OPT_LEVELS,
    DEFAULT_PROVIDERS,
    OPT_LEVELS,
    PROVIDER_CHOICES,
)
from bnexport.errors import (
    BnexportError,
    ParityInputError,
    ProviderUnavailableError,
    raise_if_interrupted,
)
from bnexport.fingerprint import verify_weights
from bnexport.machine import cpu_model, versions
from bnexport.ort import SessionConfig, probe_cuda
from bnexport.parity.inputs import InputConfig, ParityInputs, TensorSpec, save_inputs
from bnexport.parity.plan import DEFAULT_TIME_BUDGET_S, build_sized_inputs
from bnexport.parity.report import ParityReport, RunnerResult
from bnexport.parity.run import run_check
from bnexport.parity.runners import REFERENCE_NAME, OnnxRuntimeRunner, Runner, TorchRunner
from bnexport.parity.tolerance import (
    DEFAULT_TOLERANCE_MODE,
    TOLERANCE_MODES,
    NoiseTolerance,
    Tolerance,
    resolve_tolerances,
)

CUDA_OPT_LEVEL = "all"
# Threads of a check: PyTorch keeps its own setting (all cores, or OMP_NUM_THREADS), and
# onnxruntime's CPU sessions use as many, without spinning: a deep model's check at 224×224 takes
# 1.4x less time on 2 cores than single-threaded. On a busy shared CPU, OpenMP's threads collapse
# (10-40x slower with 2 threads at load 10 on 2 cores): set OMP_NUM_THREADS=1 there (the tests do).
DEFAULT_TORCH_THREADS: int | None = None  # None: leave torch's setting alone
DEFAULT_ORT_THREADS: int | None = None  # None: torch's thread count; 0: onnxruntime's choice
DEFAULT_ORT_SPINNING = False
_CUDA_RUNNERS = ("ort-cuda", "ort-cuda-tf32")

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class CheckConfig:
    """What to run and how strictly. CLI flags map one-to-one onto these fields.

    ``providers``: ``("auto",)`` = CPU, plus CUDA when the probe proves it runs (else the CUDA
    runners are listed as skipped with the reason); ``("cuda",)`` or ``("cpu", "cuda")`` demand
    CUDA (``ProviderUnavailableError`` when it does not run). ``tolerances`` override
    ``DEFAULT_TOLERANCES`` per runner kind. ``tf32_gate`` makes the CUDA-with-TF32 runner gate.
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
    cuda_device_id: int = 0
    torch_threads: int | None = DEFAULT_TORCH_THREADS  # None: leave torch's setting alone
    ort_threads: int | None = DEFAULT_ORT_THREADS  # None: torch's count; 0: onnxruntime's
    ort_spinning: bool = DEFAULT_ORT_SPINNING

    def __post_init__(self) -> None:
        self._check_runners()
        self._check_sizes()
        self._check_tolerances()

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


def check_parity(
    onnx_model: str | os.PathLike[str] | bytes,
    reference: Any,
    config: CheckConfig | None = None,
    *,
    normalize: Any = None,
    input_shape: tuple[int, ...] | Sequence[tuple[int, ...]] | None = None,
    folded: Any = None,
    reference_name: str = "",
    progress: Progress | None = None,
    rebuild: Callable[[], Any] | None = None,
) -> ParityReport:
    """Compare ``onnx_model`` (a path or bytes) with the PyTorch ``reference`` module.

    ``normalize`` (a :class:`bnexport.data.Normalize`) lets the bundled/IDX images be fed;
    ``input_shape`` (no batch dim) is the reference's input shape, or one per ONNX input in order,
    checked against the ONNX model; ``folded`` is a folded PyTorch module to check (by default
    ``bnexport.fold`` folds ``reference`` when ``config.folded``). ``rebuild`` builds the reference
    again (a ``--model`` factory): on a weights mismatch, it tells an unseeded factory apart.
    ``progress(stage, done, total)`` is called as runners finish. Returns a
    :class:`ParityReport`; never prints, never exits.
    """
    config = config or CheckConfig()
    with _torch_threads(config.torch_threads):
        started = time.perf_counter()
        check = _prepare(
            onnx_model,
            reference,
            config,
            normalize=normalize,
            input_shape=input_shape,
            folded=folded,
            reference_name=reference_name,
            rebuild=rebuild,
        )
        results = run_check(check, progress)
        return _report(check, results, time.perf_counter() - started)


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Run with ``torch.set_num_threads(n)``, restoring the previous count afterwards."""
    import torch

    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------
# Before running: the model, its runners and the inputs


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


def _prepare(
    onnx_model: str | os.PathLike[str] | bytes,
    reference: Any,
    config: CheckConfig,
    *,
    normalize: Any,
    input_shape: tuple[int, ...] | Sequence[tuple[int, ...]] | None,
    folded: Any,
    reference_name: str,
    rebuild: Callable[[], Any] | None,
) -> PreparedCheck:
    """Everything before the first comparison; bad input raises here, before the long runs."""
    data, where = _model_bytes(onnx_model)
    model_info = _model_info(data, where)
    weights, notes = verify_weights(
        model_info["metadata"], reference, rebuild=rebuild, name=reference_name
    )
    use_cpu, use_cuda, probe, cuda_skip = resolve_providers(config)
    reference.eval()
    # Sessions open the file by path, so onnxruntime finds external data beside the model.
    session_model = data if isinstance(onnx_model, bytes) else Path(onnx_model)
    ort_runners, skipped = _ort_runners(session_model, config, use_cpu, use_cuda, cuda_skip)
    in_specs, out_specs = _check_specs(ort_runners)
    _check_input_dtypes(reference, in_specs)
    names = ([s.name for s in in_specs], [s.name for s in out_specs])
    ref_runner = _reference_runner(reference, *names)
    asked = _batch_sizes(in_specs, config.batch_sizes)
    gt_runner = _ground_truth_runner(reference, *names, config, skipped)
    inputs, batch_sizes, plan = build_sized_inputs(
        ref_runner,
        in_specs,
        config,
        asked,
        normalize,
        input_shape,
        n_ort=len(ort_runners),
        truth_runner=gt_runner,
        ort_runner=ort_runners[0] if ort_runners else None,
    )
    if config.save_inputs is not None:
        save_inputs(inputs, config.save_inputs)
    torch_runners = _torch_runners(reference, folded, names, inputs, config, gt_runner, skipped)
    return PreparedCheck(
        config=config,
        reference=reference,
        reference_name=reference_name,
        model_info=model_info,
        weights=weights,
        notes=notes + plan,
        cuda_probe=probe,
        use_cuda=use_cuda,
        skipped=skipped,
        in_specs=in_specs,
        out_specs=out_specs,
        ref_runner=ref_runner,
        gt_runner=gt_runner,
        torch_runners=torch_runners,
        ort_runners=ort_runners,
        inputs=inputs,
        batch_sizes=batch_sizes,
    )


def _model_bytes(onnx_model: str | os.PathLike[str] | bytes) -> tuple[bytes, str]:
    if isinstance(onnx_model, bytes):
        return onnx_model, "<bytes>"
    path = Path(onnx_model)
    if not path.is_file():
        raise ParityInputError(f"ONNX model {path} not found; check the path")
    return path.read_bytes(), str(path)


def _model_info(data: bytes, where: str) -> dict[str, Any]:
    import onnx

    try:
        proto = onnx.load_model_from_string(data)
    except Exception as exc:
        raise ParityInputError(f"{where} is not an ONNX model: {exc}") from None
    opsets = {op.domain or "ai.onnx": op.version for op in proto.opset_import}
    return {
        "path": where,
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "opset": opsets.get("ai.onnx"),
        "producer": f"{proto.producer_name} {proto.producer_version}".strip(),
        "metadata": {p.key: p.value for p in proto.metadata_props},
    }


def resolve_providers(config: CheckConfig) -> tuple[bool, bool, dict[str, Any] | None, str]:
    """(use cpu, use cuda, probe dict, reason CUDA is skipped or '')."""
    wanted = set(config.providers)
    use_cpu = "cpu" in wanted or "auto" in wanted
    probe = None
    use_cuda = False
    skip_reason = ""
    if "cuda" in wanted or "auto" in wanted:
        result = probe_cuda(config.cuda_device_id)
        probe = result.to_dict()
        if result.available:
            use_cuda = True
        elif "cuda" in wanted:
            raise ProviderUnavailableError(
                f"--providers {','.join(config.providers)}: CUDA does not run here: {result.reason}"
            )
        else:
            skip_reason = f"CUDA does not run here: {result.reason}"
    return use_cpu, use_cuda, probe, skip_reason


def _ort_runners(
    model: Path | bytes, config: CheckConfig, use_cpu: bool, use_cuda: bool, cuda_skip: str
) -> tuple[list[OnnxRuntimeRunner], list[dict[str, str]]]:
    """The onnxruntime candidates, and the runners skipped with the reason."""
    runners = _cpu_runners(model, config) if use_cpu else []
    skipped: list[dict[str, str]] = []
    if use_cuda:
        runners += _cuda_runners(model, config)
    elif cuda_skip:
        skipped += [{"runner": n, "reason": cuda_skip} for n in _CUDA_RUNNERS]
    if not runners:
        raise ParityInputError("no onnxruntime runner to check: choose --providers cpu or cuda")
    return runners, skipped


def _cpu_runners(model: Path | bytes, config: CheckConfig) -> list[OnnxRuntimeRunner]:
    """onnxruntime CPU at each of ``config.opt_levels``."""
    import torch

    threads = torch.get_num_threads() if config.ort_threads is None else config.ort_threads
    return [
        OnnxRuntimeRunner(
            model,
            SessionConfig(
                provider="cpu",
                graph_optimization_level=level,  # type: ignore[arg-type]
                intra_op_num_threads=threads,
                allow_spinning=config.ort_spinning,
            ),
            name=f"ort-cpu-{level}",
            kind="cpu",
        )
        for level in dict.fromkeys(config.opt_levels)
    ]


def _cuda_runners(model: Path | bytes, config: CheckConfig) -> list[OnnxRuntimeRunner]:
    """onnxruntime CUDA with ``use_tf32=0`` (gating) and with TF32 (gating with ``tf32_gate``)."""
    runners = []
    for name, tf32, kind, gating in (
        (_CUDA_RUNNERS[0], "0", "cuda", True),
        (_CUDA_RUNNERS[1], "1", "cuda-tf32", config.tf32_gate),
    ):
        runners.append(
            OnnxRuntimeRunner(
                model,
                SessionConfig(
                    provider="cuda",
                    graph_optimization_level=CUDA_OPT_LEVEL,
                    device_id=config.cuda_device_id,
                    provider_options={"use_tf32": tf32},
                ),
                name=name,
                kind=kind,
                gating=gating,
                description=f"onnxruntime CUDA, use_tf32={tf32}"
                + ("" if gating else " (reported, not gating)"),
            )
        )
    return runners


def _check_specs(runners: Sequence[OnnxRuntimeRunner]) -> tuple[tuple[TensorSpec, ...], ...]:
    first = runners[0]
    for r in runners[1:]:
        if r.input_specs != first.input_specs or r.output_specs != first.output_specs:
            raise ParityInputError(
                f"{r.name} sees inputs/outputs {r.input_specs}/{r.output_specs}, {first.name} sees "
                f"{first.input_specs}/{first.output_specs}"
            )
    return first.input_specs, first.output_specs


def _check_input_dtypes(reference: Any, in_specs: Sequence[TensorSpec]) -> None:
    """Float ONNX inputs must have the precision of the PyTorch model's parameters."""
    ref_dtype = _reference_dtype(reference)
    for spec in in_specs:
        if ref_dtype is not None and spec.dtype.kind == "f" and spec.dtype != ref_dtype:
            raise ParityInputError(
                f"ONNX input {spec.describe()} but the PyTorch model's parameters are {ref_dtype}; "
                "export and check in the same precision"
            )


def _reference_dtype(model: Any) -> np.dtype | None:
    import torch

    for p in model.parameters():
        if p.is_floating_point():
            return np.dtype(torch.empty(0, dtype=p.dtype).numpy().dtype)
    return None


def _batch_sizes(
    in_specs: Sequence[TensorSpec], asked: tuple[int, ...] | None
) -> tuple[int, ...] | None:
    """The asked batch sizes; a model with a fixed batch gets its own, and refuses others."""
    static_batch = next((s.shape[0] for s in in_specs if s.shape and s.shape[0]), None)
    batch_sizes = asked
    if static_batch is not None and batch_sizes is None:
        batch_sizes = (static_batch,)
    for spec in in_specs:
        static = spec.shape[0] if spec.shape else None
        if static is not None and any(b != static for b in batch_sizes or ()):
            raise ParityInputError(
                f"ONNX input {spec.describe()} has a fixed batch of {static}, so batch sizes "
                f"{list(batch_sizes or ())} cannot run; export with a dynamic batch dimension or "
                f"use --batch-sizes {static}"
            )
    return batch_sizes


def _reference_runner(reference: Any, in_names: list[str], out_names: list[str]) -> TorchRunner:
    return TorchRunner(
        reference,
        in_names,
        out_names,
        name=REFERENCE_NAME,
        description="PyTorch fp32 on the CPU, unfolded (the reference; its error against the "
        "float64 truth is the noise floor)",
    )


def _torch_runners(
    reference: Any,
    folded: Any,
    names: tuple[list[str], list[str]],
    inputs: ParityInputs,
    config: CheckConfig,
    gt_runner: TorchRunner | None,
    skipped: list[dict[str, str]],
) -> list[TorchRunner]:
    """The PyTorch candidates: the float64 truth itself with fixed tolerances (in noise mode it
    sets the floor instead), and the folded model."""
    noise_mode = config.tolerance_mode == "noise"
    candidates = [gt_runner] if gt_runner is not None and not noise_mode else []
    if config.folded:
        candidates += _folded_runner(reference, folded, *names, inputs, skipped)
    return candidates


def _ground_truth_runner(
    reference: Any,
    in_names: list[str],
    out_names: list[str],
    config: CheckConfig,
    skipped: list[dict[str, str]],
) -> TorchRunner | None:
    """The float64 truth (None with ``--no-fp64``, or skipped when the model cannot be cast)."""
    if not config.ground_truth:
        return None
    try:
        return TorchRunner(
            reference,
            in_names,
            out_names,
            name="torch-fp64",
            dtype="float64",
            kind="torch",
            gating=False,
            description="PyTorch float64 on the CPU, unfolded (the truth)",
        )
    except BnexportError:
        raise
    except Exception as exc:  # a model that cannot be deep-copied or cast to float64
        if config.tolerance_mode == "noise":
            raise ParityInputError(
                f"the noise-relative check needs a float64 copy of the model, which fails "
                f"({type(exc).__name__}: {exc}); use --tolerance fixed"
            ) from None
        skipped.append({"runner": "torch-fp64", "reason": f"cannot make a float64 copy: {exc}"})
        return None


def _folded_runner(
    reference: Any,
    folded: Any,
    in_names: list[str],
    out_names: list[str],
    inputs: ParityInputs,
    skipped: list[dict[str, str]],
) -> list[TorchRunner]:
    """The BN-folded PyTorch model (`folded`, or ``reference`` folded here); [] when skipped."""
    import torch

    why = ""
    if folded is None:
        example = tuple(torch.from_numpy(a[:2].copy()) for a in inputs.arrays().values())
        folded, why = _fold(reference, example)
    if folded is None:
        skipped.append({"runner": "torch-folded", "reason": why})
        return []
    return [
        TorchRunner(
            folded,
            in_names,
            out_names,
            name="torch-folded",
            kind="torch",
            description="PyTorch fp32 on the CPU, BatchNorm folded",
        )
    ]


def _fold(reference: Any, example: tuple[Any, ...]) -> tuple[Any | None, str]:
    try:
        from bnexport.fold import fold_model
    except ImportError as exc:
        return None, f"bnexport.fold is not available ({exc})"
    try:
        # No self-check: this runner is itself checked against the float64 truth.
        result = fold_model(reference, example, verify=False)
    except Exception as exc:  # folding is not what is checked: any failure skips this runner
        raise_if_interrupted(exc)
        return None, f"the model cannot be folded: {type(exc).__name__}: {exc}"
    return result.module, ""


# --------------------------------------------------------------------------------------------
# The report


def _report(check: PreparedCheck, results: list[RunnerResult], seconds: float) -> ParityReport:
    """The verdict (every gating runner passed, and at least one ran) and its provenance."""
    config = check.config
    gating = [r for r in results if r.gating]
    passed = bool(gating) and all(r.passed for r in gating)
    if not gating:
        check.notes.append("no gating runner ran, so the check cannot pass")
    return ParityReport(
        passed=passed,
        model=check.model_info
        | {
            "inputs": [s.to_dict() for s in check.in_specs],
            "outputs": [s.to_dict() for s in check.out_specs],
        },
        reference={
            **check.ref_runner.info(),
            "runner": check.ref_runner.name,
            "name": check.reference_name or type(check.reference).__name__,
            "weights_sha256": check.weights,
        },
        runners=[r.info() for r in check.candidates],
        skipped=check.skipped,
        results=results,
        inputs=check.inputs.summary()
        | {"saved_to": str(config.save_inputs) if config.save_inputs else None},
        batch_sizes=list(check.batch_sizes),
        tolerances=resolve_tolerances(config.tolerances),
        tolerance_mode=config.tolerance_mode,
        noise_tolerance=config.noise_tolerance,
        versions=versions(),
        device=_device(check.use_cuda),
        cuda_probe=check.cuda_probe,
        seconds=seconds,
        notes=check.notes,
    )


def _device(cuda: bool) -> dict[str, Any]:
    """Where the check ran: platform, CPU, thread count, and the GPU when CUDA ran."""
    import platform

    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if cuda and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
