"""Before a parity check runs: the ONNX model opened and its weights checked against the
reference, the runners built (onnxruntime CPU at each optimization level, CUDA when it runs, the
PyTorch reference, truth and candidates), the inputs sized (:mod:`bnexport.parity.plan`).

Bad input raises here, before the long runs.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bnexport.errors import BnexportError, ParityInputError, ProviderUnavailableError
from bnexport.fingerprint import verify_weights
from bnexport.ort import SessionConfig, probe_cuda
from bnexport.parity.config import CUDA_OPT_LEVEL, CheckConfig, PreparedCheck
from bnexport.parity.inputs import save_inputs
from bnexport.parity.plan import build_sized_inputs
from bnexport.runners import OnnxRuntimeRunner, TorchRunner
from bnexport.signature import TensorSpec

#: The name of the fp32 reference runner in reports.
REFERENCE_NAME = "torch-fp32"
CUDA_RUNNERS = ("ort-cuda", "ort-cuda-tf32")


def prepare_check(
    onnx_model: str | os.PathLike[str] | bytes,
    reference: Any,
    config: CheckConfig,
    *,
    normalize: Any,
    input_shape: tuple[int, ...] | Sequence[tuple[int, ...]] | None,
    folded: Any,
    folded_reason: str,
    reference_name: str,
    rebuild: Callable[[], Any] | None,
) -> PreparedCheck:
    """Everything before the first comparison; bad input raises here, before the long runs.

    ``folded``: the BN-folded model to run as a candidate (``folded_reason`` says why it is None).
    """
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
    )
    inputs.pad_batches = _static_batch(in_specs) is not None
    if config.save_inputs is not None:
        save_inputs(inputs, config.save_inputs)
    torch_runners = _torch_candidates(config, gt_runner, folded, folded_reason, names, skipped)
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
    from bnexport.onnx_file import check_onnx_path

    path = check_onnx_path(onnx_model)
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
        skipped += [{"runner": n, "reason": cuda_skip} for n in CUDA_RUNNERS]
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
        (CUDA_RUNNERS[0], "0", "cuda", True),
        (CUDA_RUNNERS[1], "1", "cuda-tf32", config.tf32_gate),
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
    static_batch = _static_batch(in_specs)
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


def _static_batch(in_specs: Sequence[TensorSpec]) -> int | None:
    """The fixed batch size of a model whose inputs have one (torch's default export), or None."""
    return next((s.shape[0] for s in in_specs if s.shape and s.shape[0]), None)


def _reference_runner(reference: Any, in_names: list[str], out_names: list[str]) -> TorchRunner:
    return TorchRunner(
        reference,
        in_names,
        out_names,
        name=REFERENCE_NAME,
        description="PyTorch fp32 on the CPU, unfolded (the reference; its error against the "
        "float64 truth is the noise floor)",
    )


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


def _torch_candidates(
    config: CheckConfig,
    gt_runner: TorchRunner | None,
    folded: Any,
    folded_reason: str,
    names: tuple[list[str], list[str]],
    skipped: list[dict[str, str]],
) -> list[TorchRunner]:
    """The PyTorch candidates: the float64 truth itself with fixed tolerances (in noise mode it
    sets the floor instead), and the folded model."""
    noise_mode = config.tolerance_mode == "noise"
    candidates = [gt_runner] if gt_runner is not None and not noise_mode else []
    if config.folded:
        candidates += _folded_runner(folded, folded_reason, *names, skipped, config.folded_gating)
    return candidates


def _folded_runner(
    folded: Any,
    reason: str,
    in_names: list[str],
    out_names: list[str],
    skipped: list[dict[str, str]],
    gating: bool = True,
) -> list[TorchRunner]:
    """The BN-folded PyTorch model; [] when there is none (skipped, with ``reason``)."""
    if folded is None:
        skipped.append({"runner": "torch-folded", "reason": reason or "no folded model given"})
        return []
    return [
        TorchRunner(
            folded,
            in_names,
            out_names,
            name="torch-folded",
            kind="torch",
            gating=gating,
            description="PyTorch fp32 on the CPU, BatchNorm folded"
            + ("" if gating else " (reported, not gating)"),
        )
    ]
