"""Parity checks: does the ONNX model compute what the PyTorch model computes?

``check_parity(onnx_model, reference, config)`` is the one call. It runs the PyTorch model
unfolded in float64 (the truth) and in fp32 on the CPU (the reference: its error against the truth
is this model's noise floor), then every candidate runner — PyTorch folded, onnxruntime CPU at each
graph optimization level, onnxruntime CUDA with ``use_tf32=0`` (and with TF32, reported) when a
probe proves CUDA really runs — over the same inputs at each batch size, and compares each
candidate per output (:mod:`bnexport.parity.compare`) under the noise-relative rule, or fixed
per-kind tolerances against the reference with ``tolerance_mode="fixed"``
(:mod:`bnexport.parity.tolerance`).

The default sample count and batch sizes adapt to the model's cost (:func:`plan_inputs`): one
forward is timed and the check sized to ``DEFAULT_TIME_BUDGET_S``.

Models may have several inputs (fed by ONNX input name; the PyTorch models get them by name or in
the forward's order) and several outputs (a dict's matched by key, others by order). Before any
run, the reference's weights are checked against the ``weights_sha256`` the ONNX model records
(`bnexport.fingerprint`).

A mismatch is a result (``report.passed`` False); bad input raises ``ParityInputError`` (a weights
mismatch ``WeightsMismatchError``); CUDA asked for and not running raises
``ProviderUnavailableError`` — never a silent CPU pass.
"""

from __future__ import annotations

import hashlib
import os
import platform
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
from bnexport.ort import SessionConfig, probe_cuda
from bnexport.parity.compare import OutputComparison, compare_output
from bnexport.parity.inputs import (
    InputConfig,
    ParityInputs,
    TensorSpec,
    build_inputs,
    load_inputs,
    save_inputs,
)
from bnexport.parity.report import ParityReport, RunnerResult
from bnexport.parity.runners import (
    REFERENCE_NAME,
    OnnxRuntimeRunner,
    Runner,
    TorchRunner,
)
from bnexport.parity.tolerance import (
    DEFAULT_TOLERANCE_MODE,
    DEFAULT_TOLERANCES,
    KIND_PRECISION,
    TOLERANCE_MODES,
    NoiseTolerance,
    Tolerance,
    parse_tolerance_overrides,
    relative_error,
    resolve_tolerances,
)

__all__ = [
    "DEFAULT_TOLERANCES",
    "CheckConfig",
    "InputConfig",
    "NoiseTolerance",
    "OnnxRuntimeRunner",
    "OutputComparison",
    "ParityInputs",
    "ParityReport",
    "RunnerResult",
    "Tolerance",
    "TorchRunner",
    "build_sized_inputs",
    "check_parity",
    "compare_output",
    "load_inputs",
    "parse_tolerance_overrides",
    "plan_inputs",
    "save_inputs",
]

DEFAULT_BATCH_SIZES: tuple[int, ...] = (1, 7, 64)
#: Seconds of model forwards a default check aims at (``plan_inputs``): the random sample count
#: and the batch sizes shrink for a model whose single forward is expensive.
DEFAULT_TIME_BUDGET_S = 6.0
#: Samples of the timed forward that sizes a default check (timed twice: the first warms up).
PROBE_SAMPLES = 4
#: Fewest random samples a default check feeds (besides the edge cases), however slow the model.
MIN_RANDOM_SAMPLES = 2
CUDA_OPT_LEVEL = "all"
# PyTorch runs single-threaded during a check: the references are small, and OpenMP's spinning
# threads collapse on a busy shared CPU (10-40x slower with 2 threads at load 10 on 2 cores).
DEFAULT_TORCH_THREADS = 1
# onnxruntime CPU sessions of a check: one thread, no spinning (parity, not speed: the same kernels,
# and 1.5-3x faster than the defaults on that busy machine).
DEFAULT_ORT_THREADS = 1
DEFAULT_ORT_SPINNING = False

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
    ort_threads: int = DEFAULT_ORT_THREADS  # 0: onnxruntime's choice
    ort_spinning: bool = DEFAULT_ORT_SPINNING

    def __post_init__(self) -> None:
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
        if self.batch_sizes is not None and (
            not self.batch_sizes
            or any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in self.batch_sizes)
        ):
            raise ParityInputError(
                f"batch sizes {list(self.batch_sizes)} must be positive integers"
            )
        if self.samples is not None and self.samples < 0:
            raise ParityInputError(f"--samples {self.samples} must be >= 0")
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


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch

    from bnexport import __version__

    return {
        "bnexport": __version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _device(cuda: bool) -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if cuda and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


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


def _check_specs(runners: Sequence[OnnxRuntimeRunner]) -> tuple[tuple[TensorSpec, ...], ...]:
    first = runners[0]
    for r in runners[1:]:
        if r.input_specs != first.input_specs or r.output_specs != first.output_specs:
            raise ParityInputError(
                f"{r.name} sees inputs/outputs {r.input_specs}/{r.output_specs}, {first.name} sees "
                f"{first.input_specs}/{first.output_specs}"
            )
    return first.input_specs, first.output_specs


def _reference_dtype(model: Any) -> np.dtype | None:
    import torch

    for p in model.parameters():
        if p.is_floating_point():
            return np.dtype(torch.empty(0, dtype=p.dtype).numpy().dtype)
    return None


def _run_all(runner: Runner, inputs: ParityInputs, batch_size: int) -> dict[str, np.ndarray]:
    chunks: dict[str, list[np.ndarray]] = {}
    for feed in inputs.batches(batch_size):
        for name, arr in runner.infer(feed).items():
            chunks.setdefault(name, []).append(arr)
    return {name: np.concatenate(parts) for name, parts in chunks.items()}


def _fold(reference: Any, example: tuple[Any, ...]) -> tuple[Any | None, str]:
    try:
        from bnexport.fold import fold_model
    except ImportError as exc:
        return None, f"bnexport.fold is not available ({exc})"
    try:
        result = fold_model(reference, example)
    except Exception as exc:  # folding is not what is checked: any failure skips this runner
        raise_if_interrupted(exc)
        return None, f"the model cannot be folded: {type(exc).__name__}: {exc}"
    return result.module, ""


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
        return _check_parity(
            onnx_model,
            reference,
            config,
            normalize=normalize,
            input_shape=input_shape,
            folded=folded,
            reference_name=reference_name,
            progress=progress,
            rebuild=rebuild,
        )


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


def _check_parity(
    onnx_model: str | os.PathLike[str] | bytes,
    reference: Any,
    config: CheckConfig,
    *,
    normalize: Any,
    input_shape: tuple[int, ...] | Sequence[tuple[int, ...]] | None,
    folded: Any,
    reference_name: str,
    progress: Progress | None,
    rebuild: Callable[[], Any] | None,
) -> ParityReport:
    import torch

    started = time.perf_counter()
    tolerances = resolve_tolerances(config.tolerances)
    data, where = _model_bytes(onnx_model)
    # Sessions open the file by path, so onnxruntime finds external data beside the model.
    session_model = data if isinstance(onnx_model, bytes) else Path(onnx_model)
    model_info = _model_info(data, where)
    weights, notes = verify_weights(
        model_info["metadata"], reference, rebuild=rebuild, name=reference_name
    )
    use_cpu, use_cuda, probe, cuda_skip = resolve_providers(config)

    reference.eval()
    skipped: list[dict[str, str]] = []
    ort_runners: list[OnnxRuntimeRunner] = []
    if use_cpu:
        for level in dict.fromkeys(config.opt_levels):
            ort_runners.append(
                OnnxRuntimeRunner(
                    session_model,
                    SessionConfig(
                        provider="cpu",
                        graph_optimization_level=level,  # type: ignore[arg-type]
                        intra_op_num_threads=config.ort_threads,
                        allow_spinning=config.ort_spinning,
                    ),
                    name=f"ort-cpu-{level}",
                    kind="cpu",
                )
            )
    cuda_names = ("ort-cuda", "ort-cuda-tf32")
    if use_cuda:
        for name, tf32, kind, gating in (
            (cuda_names[0], "0", "cuda", True),
            (cuda_names[1], "1", "cuda-tf32", config.tf32_gate),
        ):
            ort_runners.append(
                OnnxRuntimeRunner(
                    session_model,
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
    elif cuda_skip:
        skipped += [{"runner": n, "reason": cuda_skip} for n in cuda_names]
    if not ort_runners:
        raise ParityInputError("no onnxruntime runner to check: choose --providers cpu or cuda")

    in_specs, out_specs = _check_specs(ort_runners)
    ref_dtype = _reference_dtype(reference)
    for spec in in_specs:
        if ref_dtype is not None and spec.dtype.kind == "f" and spec.dtype != ref_dtype:
            raise ParityInputError(
                f"ONNX input {spec.describe()} but the PyTorch model's parameters are {ref_dtype}; "
                "export and check in the same precision"
            )
    in_names = [s.name for s in in_specs]
    out_names = [s.name for s in out_specs]
    ref_runner = TorchRunner(
        reference,
        in_names,
        out_names,
        name=REFERENCE_NAME,
        description="PyTorch fp32 on the CPU, unfolded (the reference; its error against the "
        "float64 truth is the noise floor)",
    )
    static_batch = next((s.shape[0] for s in in_specs if s.shape and s.shape[0]), None)
    batch_sizes = config.batch_sizes
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

    inputs, batch_sizes, plan = build_sized_inputs(
        ref_runner, in_specs, config, batch_sizes, normalize, input_shape, n_ort=len(ort_runners)
    )
    notes += plan
    if config.save_inputs is not None:
        save_inputs(inputs, config.save_inputs)

    candidates: list[Runner] = []
    gt_runner: TorchRunner | None = None
    noise_mode = config.tolerance_mode == "noise"
    if config.ground_truth:
        try:
            gt_runner = TorchRunner(
                reference,
                in_names,
                out_names,
                name="torch-fp64",
                dtype="float64",
                kind="torch",
                gating=False,
                description="PyTorch float64 on the CPU, unfolded (the truth)",
            )
            if not noise_mode:
                candidates.append(gt_runner)
        except BnexportError:
            raise
        except Exception as exc:  # a model that cannot be deep-copied or cast to float64
            if noise_mode:
                raise ParityInputError(
                    f"the noise-relative check needs a float64 copy of the model, which fails "
                    f"({type(exc).__name__}: {exc}); use --tolerance fixed"
                ) from None
            skipped.append({"runner": "torch-fp64", "reason": f"cannot make a float64 copy: {exc}"})
    if config.folded:
        folded_module, why = (
            (folded, "")
            if folded is not None
            else _fold(
                reference, tuple(torch.from_numpy(a[:2].copy()) for a in inputs.arrays().values())
            )
        )
        if folded_module is None:
            skipped.append({"runner": "torch-folded", "reason": why})
        else:
            candidates.append(
                TorchRunner(
                    folded_module,
                    in_names,
                    out_names,
                    name="torch-folded",
                    kind="torch",
                    description="PyTorch fp32 on the CPU, BatchNorm folded",
                )
            )
    candidates += ort_runners

    # PyTorch runs once, at the largest batch size: its batching is not what is being checked, and
    # every onnxruntime batch size is compared with the same reference outputs (so a candidate that
    # mixes samples across a batch is caught too).
    ref_batch = max(batch_sizes)
    torch_candidates = [r for r in candidates if isinstance(r, TorchRunner)]
    total = (
        1
        + 2 * (gt_runner is not None and noise_mode)
        + len(torch_candidates)
        + len(ort_runners) * len(batch_sizes)
    )
    done = 0

    def step(stage: str) -> None:
        nonlocal done
        done += 1
        if progress:
            progress(stage, done, total)

    ref_out = _run_reference(ref_runner, inputs, ref_batch)
    _check_outputs(ref_out, out_specs)
    step(f"{REFERENCE_NAME} batch {ref_batch}")

    gt_out: dict[str, np.ndarray] | None = None
    noise: dict[str, float] = {}
    if gt_runner is not None and noise_mode:
        gt_out = _run_reference(gt_runner, inputs, ref_batch)
        step(f"{gt_runner.name} batch {ref_batch}")
        # The noise floor is PyTorch fp32's error over two of its own execution paths: the largest
        # batch and batch 1 run different kernels, and on ill-conditioned inputs their errors
        # differ several-fold (docs/parity.md).
        draws = [ref_out]
        if ref_batch != 1:
            draws.append(_run_reference(ref_runner, inputs, 1))
            step(f"{REFERENCE_NAME} batch 1")
        noise = {n: max(relative_error(d[n], gt_out[n]).value for d in draws) for n in out_names}
    results: list[RunnerResult] = []
    plan_runs = [(r, ref_batch) for r in torch_candidates]
    plan_runs += [(r, b) for b in batch_sizes for r in ort_runners]
    for runner, batch in plan_runs:
        t0 = time.perf_counter()
        try:
            out = _run_all(runner, inputs, batch)
            error = None
        except BnexportError:
            raise
        except Exception as exc:
            raise_if_interrupted(exc)
            out, error = {}, f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        if runner is gt_runner and error is None:
            gt_out = out
        result = RunnerResult(
            runner=runner.name,
            kind=runner.kind,
            gating=runner.gating,
            batch_size=batch,
            batches=-(-inputs.size // batch),
            samples=inputs.size,
            seconds=time.perf_counter() - t0,
            tolerance=config.tolerance_for(runner.kind),
            error=error,
        )
        if error is None:
            truth = gt_out if runner is not gt_runner else None
            for name in out_names:
                result.outputs.append(
                    _compare(
                        runner,
                        name,
                        out[name],
                        ref_out[name],
                        result.tolerance,
                        inputs,
                        truth=None if truth is None else truth[name],
                        noise=noise.get(name),
                    )
                )
                if gt_out is not None and runner is not gt_runner:
                    result.ground_truth_max_abs_err[name] = _max_abs_err(out[name], gt_out[name])
        results.append(result)
        step(f"{runner.name} batch {batch}")

    gating = [r for r in results if r.gating]
    passed = bool(gating) and all(r.passed for r in gating)
    if not gating:
        notes.append("no gating runner ran, so the check cannot pass")
    return ParityReport(
        passed=passed,
        model=model_info
        | {
            "inputs": [s.to_dict() for s in in_specs],
            "outputs": [s.to_dict() for s in out_specs],
        },
        reference={
            **ref_runner.info(),
            "runner": ref_runner.name,
            "name": reference_name or type(reference).__name__,
            "weights_sha256": weights,
        },
        runners=[r.info() for r in candidates],
        skipped=skipped,
        results=results,
        inputs=inputs.summary()
        | {"saved_to": str(config.save_inputs) if config.save_inputs else None},
        batch_sizes=list(batch_sizes),
        tolerances=tolerances,
        tolerance_mode=config.tolerance_mode,
        noise_tolerance=config.noise_tolerance,
        versions=_versions(),
        device=_device(use_cuda),
        cuda_probe=probe,
        seconds=time.perf_counter() - started,
        notes=notes,
    )


def _compare(
    runner: Runner,
    name: str,
    cand: np.ndarray,
    ref: np.ndarray,
    tol: Tolerance | NoiseTolerance,
    inputs: ParityInputs,
    *,
    truth: np.ndarray | None,
    noise: float | None = None,
) -> OutputComparison:
    if cand.shape != ref.shape:
        raise ParityInputError(
            f"output {name!r}: {runner.name} gives shape {list(cand.shape)}, the PyTorch "
            f"reference {list(ref.shape)}; the ONNX and PyTorch models do not compute the same "
            "thing"
        )
    if isinstance(runner, OnnxRuntimeRunner) and cand.dtype != ref.dtype:
        raise ParityInputError(
            f"output {name!r}: {runner.name} gives {cand.dtype}, the PyTorch reference "
            f"{ref.dtype}; export and check in the same precision"
        )
    return compare_output(
        name,
        cand,
        ref,
        tol,
        truth=truth,
        noise=noise,
        precision=KIND_PRECISION.get(runner.kind, 1.0),
        locate=inputs.locate,
    )


def _run_reference(runner: TorchRunner, inputs: ParityInputs, batch: int) -> dict[str, np.ndarray]:
    """Run a PyTorch reference (fp32 or the float64 truth); its failure is bad input."""
    try:
        return _run_all(runner, inputs, batch)
    except BnexportError:
        raise
    except Exception as exc:
        raise ParityInputError(
            f"the PyTorch model ({runner.name}) fails on the inputs (batch {batch}): "
            f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        ) from None


def plan_inputs(
    seconds_per_sample: float,
    fixed_samples: int,
    *,
    random_count: int,
    runs_per_sample: float,
    budget_s: float = DEFAULT_TIME_BUDGET_S,
) -> tuple[int, bool]:
    """``(random samples, cheap)`` for a model whose fp32 forward takes ``seconds_per_sample``.

    A check costs about ``seconds_per_sample · runs_per_sample`` per sample fed (fp32, float64 ≈ 2,
    folded, each onnxruntime level × batch size). The ``fixed_samples`` (edge cases, images) are
    always fed; random samples fill the rest of ``budget_s``, between ``MIN_RANDOM_SAMPLES`` and
    ``random_count``. ``cheap``: everything fits with the default batch sizes.
    """
    per_sample = max(seconds_per_sample, 1e-9) * runs_per_sample
    room = int(budget_s / per_sample) - fixed_samples
    random = max(min(random_count, room), min(MIN_RANDOM_SAMPLES, random_count))
    return random, (fixed_samples + random_count) * per_sample <= budget_s


def build_sized_inputs(
    ref_runner: TorchRunner,
    in_specs: Sequence[TensorSpec],
    config: CheckConfig,
    batch_sizes: tuple[int, ...] | None,
    normalize: Any,
    input_shape: Any,
    *,
    n_ort: int,
) -> tuple[ParityInputs, tuple[int, ...], list[str]]:
    """The inputs and batch sizes to run: the configured ones, or sized to the model's cost
    (`plan_inputs`): a check runs fp32 twice, float64, one torch candidate and ``n_ort``
    onnxruntime runners per batch size."""
    from dataclasses import replace

    wanted = config.inputs.random_count if config.samples is None else config.samples
    inputs_cfg = replace(config.inputs, random_count=wanted)
    if (config.samples is not None or inputs_cfg.inputs_file is not None) and batch_sizes:
        inputs = build_inputs(in_specs, inputs_cfg, normalize=normalize, input_shape=input_shape)
        return inputs, batch_sizes, []
    probe_cfg = replace(
        inputs_cfg, random_count=PROBE_SAMPLES, edge_cases=False, bundled=False, data_dir=None
    )
    if inputs_cfg.inputs_file is not None:
        probe_cfg = inputs_cfg
    probe = build_inputs(in_specs, probe_cfg, normalize=normalize, input_shape=input_shape)
    one = {k: v[:PROBE_SAMPLES] for k, v in probe.arrays().items()}
    n_probe = next(iter(one.values())).shape[0]
    timings = []
    for _ in range(2):  # the first call warms up
        t0 = time.perf_counter()
        try:
            ref_runner.infer(one)
        except BnexportError:
            raise
        except Exception as exc:
            raise ParityInputError(
                f"the PyTorch reference fails on the inputs: {type(exc).__name__}: "
                f"{' '.join(str(exc).split())}"
            ) from None
        timings.append(time.perf_counter() - t0)
    per_sample = timings[-1] / max(n_probe, 1)
    if inputs_cfg.inputs_file is not None:
        fixed = probe.size
    elif inputs_cfg.edge_cases or inputs_cfg.bundled is not False or inputs_cfg.data_dir:
        fixed = build_inputs(
            in_specs,
            replace(inputs_cfg, random_count=0),
            normalize=normalize,
            input_shape=input_shape,
        ).size
    else:  # random samples only
        fixed = 0
    n_batches = len(batch_sizes or DEFAULT_BATCH_SIZES)
    runs = 5.0 + n_ort * n_batches  # fp32 twice, float64 (≈ 2), folded; onnxruntime
    random, cheap = plan_inputs(
        per_sample,
        fixed,
        random_count=wanted if config.samples is None else config.samples,
        runs_per_sample=runs,
        budget_s=config.time_budget_s,
    )
    notes: list[str] = []
    if config.samples is not None or inputs_cfg.inputs_file is not None:
        random = wanted
    elif random < wanted:
        notes.append(
            f"{random} of {wanted} random samples (a forward takes {per_sample * 1e3:.0f} ms; "
            f"{config.time_budget_s:g} s budget; --samples N overrides)"
        )
    if batch_sizes is None:
        batch_sizes = DEFAULT_BATCH_SIZES if cheap else DEFAULT_BATCH_SIZES[:2]
    if inputs_cfg.inputs_file is not None:
        return probe, batch_sizes, notes
    inputs = build_inputs(
        in_specs,
        replace(inputs_cfg, random_count=random),
        normalize=normalize,
        input_shape=input_shape,
    )
    return inputs, batch_sizes, notes


def _max_abs_err(cand: np.ndarray, truth: np.ndarray) -> float:
    """``max|a − t|`` in float64; a NaN on either side counts as infinitely far."""
    if not cand.size:
        return 0.0
    with np.errstate(invalid="ignore"):
        err = np.abs(cand.astype(np.float64) - truth.astype(np.float64))
    return float(np.max(np.where(np.isnan(err), np.inf, err)))


def _check_outputs(ref_out: Mapping[str, np.ndarray], specs: Sequence[TensorSpec]) -> None:
    """The reference's outputs must fit the ONNX outputs' static dims and dtypes."""
    for spec in specs:
        arr = ref_out[spec.name]
        if arr.ndim != len(spec.shape) or any(
            d is not None and d != a for d, a in zip(spec.shape, arr.shape, strict=False)
        ):
            raise ParityInputError(
                f"ONNX output {spec.describe()} but the PyTorch model returns shape "
                f"{list(arr.shape)} for it; the models' outputs do not match (by name or order)"
            )
        if arr.dtype != spec.dtype:
            raise ParityInputError(
                f"ONNX output {spec.describe()} but the PyTorch model returns {arr.dtype}; export "
                "and check in the same precision"
            )
