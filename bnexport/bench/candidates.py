"""The candidates a bench run times, each set up as its users would, with what it is and its ops.

* ``torch_eager`` — PyTorch eager on the model as loaded (the baseline every ratio is against);
* ``torch_eager_folded`` — PyTorch eager on ``fold_model(...)``'s module;
* ``ort_torch_export`` — onnxruntime CPU on torch's own default export of the *unfolded* model
  (``torch.onnx.export(model, (x,), dynamo=True)`` with a dynamic batch, default options) in a
  session with onnxruntime's default ``SessionOptions``: the obvious alternative to bnexport;
* ``ort_bnexport`` — onnxruntime CPU on bnexport's folded export, with bnexport's default session
  options (`bnexport.ort.SessionConfig`);
* ``ort_bnexport_cuda`` — the same file on onnxruntime's CUDA provider, only when
  `bnexport.ort.probe_cuda` proves it runs (otherwise listed as unavailable, with the reason);
* ``ort_tuned:<file>`` — a file from ``bnexport tune``, opened with what it carries (its
  ``ort_config``; its session config entries through bnexport's session factory).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnexport.bench.config import (
    BASELINE,
    BNEXPORT_CUDA,
    LABELS,
    REFERENCE_EXPORT,
    TUNED_PREFIX,
    BenchConfig,
)
from bnexport.bench.report import CandidateInfo
from bnexport.errors import BnexportError, raise_if_interrupted
from bnexport.runners import OnnxRuntimeRunner, Runner

if TYPE_CHECKING:
    import numpy as np
    import torch

# A candidate "matches" when max|out - baseline out| <= OUTPUT_MATCH_RTOL * max|baseline out|:
# loose on purpose (fp32 folding and kernel order differ by ~1e-6); it catches a wrong --onnx file.
OUTPUT_MATCH_RTOL = 1e-3

#: A candidate, and its runner (None: it did not run; `CandidateInfo.reason` says why).
Candidate = tuple[CandidateInfo, OnnxRuntimeRunner | None]


def with_output_errors(
    infos: list[CandidateInfo], runners: Sequence[Runner], feed: Mapping[str, np.ndarray]
) -> list[CandidateInfo]:
    """Record each runner's max |output − baseline output| on ``feed`` (its first output): a wrong
    model is no win."""
    import numpy as np

    by_name = {info.name: info for info in infos}
    outputs = {r.name: _first_output(r, feed, by_name[r.name]) for r in runners}
    ref = outputs[BASELINE]
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    result = []
    for info in infos:
        if info.name in outputs:
            out = outputs[info.name]
            if out.shape != ref.shape:
                diff = math.inf
            else:
                diff = float(np.max(np.abs(out - ref))) if ref.size else 0.0
            info = replace(info, max_abs_diff=diff, matches=diff <= OUTPUT_MATCH_RTOL * scale)
        result.append(info)
    return result


def _first_output(runner: Runner, feed: Mapping[str, np.ndarray], info: CandidateInfo) -> Any:
    """The runner's first output on ``feed``; onnxruntime's failure to run a file is a
    `BnexportError` naming the file (a shape its weights contradict, a type it has no kernel
    for), not a crash halfway through the timing."""
    try:
        return _as_numpy(runner.prepare(feed)())
    except Exception as exc:
        raise_if_interrupted(exc)
        if type(exc).__module__.split(".")[0] != "onnxruntime":
            raise
        raise BnexportError(
            f"{info.model_path or info.label} cannot run on onnxruntime ({info.label}): "
            f"{' '.join(str(exc).split())}; the file is broken or not this model's export: "
            "re-export it"
        ) from exc


def _as_numpy(output: Any) -> np.ndarray:
    import numpy as np

    if isinstance(output, (list, tuple)):
        output = output[0]
    if hasattr(output, "detach"):
        output = output.detach().cpu().numpy()
    return np.asarray(output, dtype=np.float64)


def bnexport_session_config(config: BenchConfig, provider: str) -> Any:
    """bnexport's default `SessionConfig` on ``provider``, at ``config.threads`` if set."""
    from bnexport.ort import SessionConfig

    session_config = SessionConfig(provider=provider)  # type: ignore[arg-type]
    if config.threads is not None:
        session_config = replace(session_config, intra_op_num_threads=config.threads)
    return session_config


def ort_candidate(
    name: str, path: Path, session_config: Any, feed_names: Sequence[str]
) -> Candidate:
    """``path`` in a bnexport session (`bnexport.ort.make_session`) with ``session_config``."""
    t0 = time.perf_counter()
    runner = OnnxRuntimeRunner(path, session_config, name=name, feed_names=feed_names)
    init_s = time.perf_counter() - t0
    info = CandidateInfo(
        name,
        LABELS[name],
        True,
        session_options=session_config.to_dict(),
        model_path=str(path),
        op_counts=op_counts(path),
        init_s=init_s,
    )
    return info, runner


def tuned_name(path: str | os.PathLike[str]) -> str:
    """The candidate name of a tuned file: ``ort_tuned:<file name>``."""
    return f"{TUNED_PREFIX}{Path(path).name}"


def tuned_candidates(
    paths: Sequence[str | os.PathLike[str]], feed_names: Sequence[str]
) -> list[tuple[CandidateInfo, OnnxRuntimeRunner]]:
    """One candidate per tuned file, opened with its own ``ort_config`` (as a deployer does)."""
    names = [tuned_name(p) for p in paths]
    if len(set(names)) != len(names):
        raise BnexportError(f"tuned files need distinct file names, got {[str(p) for p in paths]}")
    return [
        _tuned_candidate(Path(path), name, feed_names)
        for path, name in zip(paths, names, strict=True)
    ]


def _tuned_candidate(
    path: Path, name: str, feed_names: Sequence[str]
) -> tuple[CandidateInfo, OnnxRuntimeRunner]:
    from bnexport.onnx_file import check_onnx_path
    from bnexport.ort import ORT_DEFAULTS, make_session
    from bnexport.ort_config import model_settings

    check_onnx_path(path, "--tuned")
    settings = model_settings(path)
    if settings is None:
        raise BnexportError(
            f"{path} carries no ort_config session options; tune it first "
            "(bnexport tune MODEL.onnx -o TUNED.onnx)"
        )
    # Session config entries are never read by onnxruntime from a file: bnexport's factory
    # applies them (as bnexport serve does); without any, the file is opened as a deployer opts in.
    how = "apply" if settings.session_config_entries else "opt_in"
    opened = {
        "apply": "bnexport.ort.make_session(file_settings='apply') over onnxruntime's defaults",
        "opt_in": "ORT_LOAD_CONFIG_FROM_MODEL=1",
    }[how]
    t0 = time.perf_counter()
    session = make_session(path, ORT_DEFAULTS, file_settings=how)
    init_s = time.perf_counter() - t0
    info = CandidateInfo(
        name,
        f"onnxruntime CPU, {path.name} (what it carries: {settings.label()})",
        True,
        session_options={"ort_config": settings.to_dict(), "opened": opened},
        model_path=str(path),
        op_counts=op_counts(path),
        init_s=init_s,
    )
    return info, OnnxRuntimeRunner.wrap(session, name=name, feed_names=feed_names)


def cuda_candidate(path: Path, config: BenchConfig, feed_names: Sequence[str]) -> Candidate:
    """``path`` on onnxruntime's CUDA provider; unavailable (with the probe's reason) without it."""
    from bnexport.ort import probe_cuda

    probe = probe_cuda()
    if not probe.available:
        return CandidateInfo(BNEXPORT_CUDA, LABELS[BNEXPORT_CUDA], False, probe.reason), None
    return ort_candidate(BNEXPORT_CUDA, path, bnexport_session_config(config, "cuda"), feed_names)


def torch_export_candidate(
    model: torch.nn.Module,
    example_input: torch.Tensor,
    path: Path,
    config: BenchConfig,
    feed_names: Sequence[str],
) -> Candidate:
    """torch's own default ONNX export of the unfolded model in a default onnxruntime session."""
    name = REFERENCE_EXPORT
    try:
        _torch_default_export(model, example_input, path)
    except Exception as exc:
        raise_if_interrupted(exc)
        reason = f"torch.onnx.export(dynamo=True) failed: {' '.join(str(exc).split())[:300]}"
        return CandidateInfo(name, LABELS[name], False, reason), None
    session, described, init_s = _default_ort_session(path, config)
    info = CandidateInfo(
        name,
        LABELS[name],
        True,
        session_options=described,
        model_path=None,  # a temporary file
        op_counts=op_counts(path),
        init_s=init_s,
    )
    return info, OnnxRuntimeRunner.wrap(session, name=name, feed_names=feed_names)


def _torch_default_export(model: torch.nn.Module, example_input: torch.Tensor, path: Path) -> None:
    """``torch.onnx.export(model, (x,), dynamo=True)`` with a dynamic batch, default options."""
    import torch

    from bnexport.export import dynamic_batch_shapes, example_batches, quiet_exporter

    inputs = example_batches(example_input)  # a batch of 1 would be specialised to a constant
    with quiet_exporter():
        program = torch.onnx.export(
            model, inputs, dynamo=True, dynamic_shapes=dynamic_batch_shapes(inputs), verbose=False
        )
        assert program is not None
        program.save(str(path))


def _default_ort_session(path: Path, config: BenchConfig) -> tuple[Any, dict[str, Any], float]:
    """``path`` in a session with onnxruntime's default options (that is the comparison): the
    session, the options described, and the seconds it took to create."""
    from bnexport.ort import ORT_DEFAULTS, make_session

    session_config = ORT_DEFAULTS  # the log level aside: ORT's warnings off the console
    if config.threads is not None:
        session_config = replace(session_config, intra_op_num_threads=config.threads)
    t0 = time.perf_counter()
    session = make_session(path, session_config)
    init_s = time.perf_counter() - t0
    options = session.get_session_options()
    described = {
        "defaults": "onnxruntime.SessionOptions()",
        "intra_op_num_threads": options.intra_op_num_threads,
        "graph_optimization_level": str(options.graph_optimization_level),
    }
    return session, described, init_s


def bnexport_export(folded: torch.nn.Module, example_input: torch.Tensor, path: Path) -> None:
    """bnexport's export of the folded model (onnxscript's BatchNorm fusions on)."""
    from bnexport.export import export_onnx

    export_onnx(folded, example_input, path, fuse_batchnorm=True)


def op_counts(path: Path) -> dict[str, int]:
    """How many nodes of each op type the ONNX file at ``path`` holds, by op type."""
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))
