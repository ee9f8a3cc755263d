"""The parity check: `check_parity` runs the stages in order and gathers the `ParityReport`.

Open the ONNX model and check the reference's weights against its fingerprint, build the runners
and size the inputs (:mod:`bnexport.parity.prepare`); run the reference, the truth and each
candidate and compare them (:mod:`bnexport.parity.run`, through :mod:`bnexport.parity.engine`);
gather the `ParityReport` with the verdict and where it ran.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from bnexport.machine import cpu_model, versions
from bnexport.parity.config import CheckConfig, PreparedCheck
from bnexport.parity.prepare import prepare_check
from bnexport.parity.report import ParityReport, RunnerResult
from bnexport.parity.run import run_check
from bnexport.parity.tolerance import resolve_tolerances
from bnexport.progress import Progress
from bnexport.runners import torch_threads


def check_parity(
    onnx_model: str | os.PathLike[str] | bytes,
    reference: Any,
    config: CheckConfig | None = None,
    *,
    normalize: Any = None,
    input_shape: tuple[int, ...] | Sequence[tuple[int, ...]] | None = None,
    folded: Any = None,
    folded_reason: str = "",
    reference_name: str = "",
    progress: Progress | None = None,
    rebuild: Callable[[], Any] | None = None,
    fold_report: Any = None,
) -> ParityReport:
    """Compare ``onnx_model`` (a path or bytes) with the PyTorch ``reference`` module.

    ``normalize`` (a :class:`bnexport.data.Normalize`) lets the bundled/IDX images be fed;
    ``input_shape`` (no batch dim) is the reference's input shape, or one per ONNX input in order,
    checked against the ONNX model; ``folded`` is the BN-folded PyTorch module to check too when
    ``config.folded`` (None: that runner is listed as skipped, with ``folded_reason``).
    ``rebuild`` builds the reference again (a ``--model`` factory): on a weights mismatch, it
    tells an unseeded factory apart. ``progress`` receives a `ProgressEvent` as each run
    finishes. ``config.localize`` says when to name the first failing layer
    (`bnexport.parity.localize`; ``fold_report``, the fold of ``folded``, maps a folded file's
    chains). Returns a :class:`ParityReport`; never prints, never exits.
    """
    config = config or CheckConfig()
    with torch_threads(config.torch_threads):
        started = time.perf_counter()
        check = prepare_check(
            onnx_model,
            reference,
            config,
            normalize=normalize,
            input_shape=input_shape,
            folded=folded,
            folded_reason=folded_reason,
            reference_name=reference_name,
            rebuild=rebuild,
        )
        results = run_check(check, progress)
        report = parity_report(check, results, time.perf_counter() - started)
        if config.localize == "always" or (config.localize == "on-failure" and not report.passed):
            from bnexport.parity.localize import localize_check

            report.layers = localize_check(
                onnx_model,
                check,
                results,
                notes=report.notes,
                fold_report=fold_report,
                folded=folded,
                requested=config.localize == "always",
                progress=progress,
            )
        if fold_report is not None:
            report.fold = fold_report.to_dict()
        return report


def parity_report(
    check: PreparedCheck, results: list[RunnerResult], seconds: float
) -> ParityReport:
    """The verdict (every gating runner passed, and at least one ran) and its provenance (also for
    a check whose candidates are not onnxruntime sessions: `bnexport check --url`)."""
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
        device=device_info(check.use_cuda),
        cuda_probe=check.cuda_probe,
        seconds=seconds,
        notes=check.notes,
    )


def device_info(cuda: bool) -> dict[str, Any]:
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
