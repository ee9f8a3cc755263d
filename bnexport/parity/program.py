"""The check of a saved `torch.export` program (.pt2): loaded back as a user would, compared with
the unfolded model through the parity engine (`bnexport fold`'s verdict)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bnexport.errors import ExportError
from bnexport.noise import NoiseTolerance
from bnexport.parity.compare import OutputComparison
from bnexport.parity.config import CheckConfig
from bnexport.parity.engine import check_candidate
from bnexport.parity.inputs import InputConfig, as_shapes
from bnexport.parity.plan import build_sized_inputs
from bnexport.parity.tolerance import Tolerance
from bnexport.runners import ProgramRunner, Runner, TorchRunner
from bnexport.signature import TensorSpec

#: The batch size the program check feeds.
DEFAULT_PROGRAM_BATCH = 64


@dataclass(frozen=True)
class ProgramCheck:
    """The saved program, loaded back as a user would, against the unfolded model (fp32, CPU).

    One comparison per output over every input sample (`bnexport.parity.compare`): max abs error,
    error relative to the output's scale, cosine, argmax agreement, and the tolerance that would
    have passed.
    """

    passed: bool
    outputs: list[OutputComparison]
    samples: int
    batch_size: int
    tolerance: Tolerance | NoiseTolerance
    inputs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "samples": self.samples,
            "batch_size": self.batch_size,
            "tolerance": self.tolerance.to_dict(),
            "outputs": [o.to_dict() for o in self.outputs],
            "inputs": dict(self.inputs),
        }


def check_program(
    path: str | os.PathLike[str],
    reference: Any,
    *,
    input_shape: tuple[int, ...] | Sequence[tuple[int, ...]],
    input_dtypes: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    normalize: Any = None,
    batch_size: int = DEFAULT_PROGRAM_BATCH,
    tolerance: Tolerance | NoiseTolerance | None = None,
    inputs: InputConfig | None = None,
) -> ProgramCheck:
    """Compare the program saved at `path` with the unfolded `reference` on the same inputs.

    The program is loaded with `torch.export.load` (as a user would), so this checks the artifact,
    not the in-memory module. `input_shape`: one shape, or one per positional input (no batch
    dim); `input_dtypes` their numpy dtype names (default float32); `output_names` name the
    outputs in the report (default: as the exporter names them). Inputs are `bnexport check`'s
    (the bundled Fashion-MNIST images when `normalize` is known and the input is one 28×28 image,
    seeded random samples and edge cases), as many as it would feed in its time budget. The
    decision is `bnexport check`'s: by default the noise rule (`bnexport.noise.NoiseTolerance`:
    the program's error against the float64 forward of `reference`, within a multiple of PyTorch
    fp32's own error); a fixed `Tolerance` compares element-wise with the fp32 reference instead.
    Raises `ExportError` when the program cannot be loaded or run.
    """
    tol = tolerance or NoiseTolerance()
    shapes = as_shapes(input_shape) or []
    names = ["input"] if len(shapes) == 1 else [f"input_{i}" for i in range(len(shapes))]
    program = ProgramRunner.load(path, names, output_names)
    specs = _input_specs(names, shapes, input_dtypes)
    out_names = program.output_names
    ref = TorchRunner(reference, names, out_names, name="torch-fp32")
    truth = None
    if isinstance(tol, NoiseTolerance):  # the truth, and a second fp32 path for the noise floor
        truth = TorchRunner(reference, names, out_names, name="torch-fp64", dtype="float64")
    config = CheckConfig(inputs=inputs or InputConfig(), batch_sizes=(batch_size,))
    feed, _, _ = build_sized_inputs(  # fp32 twice, float64, the program: a check's cost
        ref, specs, config, (batch_size,), normalize, shapes, n_ort=0, truth_runner=truth
    )
    comparisons = check_candidate(
        program,
        ref,
        truth,
        feed,
        batch_size,
        tolerance=tol,
        noise_batches=(1,),
        fail=_run_failure,
        candidate_fail=_run_failure,
    )
    return ProgramCheck(
        passed=all(c.passed for c in comparisons),
        outputs=comparisons,
        samples=feed.size,
        batch_size=batch_size,
        tolerance=tol,
        inputs=feed.summary(),
    )


def _input_specs(
    names: list[str], shapes: list[tuple[int, ...]], dtypes: Sequence[str] | None
) -> list[TensorSpec]:
    """One `TensorSpec` per input, batch dimension symbolic (dtypes default to float32)."""
    import numpy as np

    dtypes = list(dtypes or ["float32"] * len(shapes))
    if len(dtypes) != len(shapes):
        raise ExportError(f"{len(shapes)} input shapes but {len(dtypes)} input dtypes")
    try:
        np_dtypes = [np.dtype(d) for d in dtypes]
    except TypeError as exc:
        raise ExportError(f"cannot feed inputs of dtypes {dtypes} to the check: {exc}") from None
    return [TensorSpec(n, (None, *s), d) for n, s, d in zip(names, shapes, np_dtypes, strict=True)]


def _run_failure(runner: Runner, batch: int, samples: int, exc: Exception) -> ExportError:
    """A run of the program or of the unfolded model that fails: an `ExportError`."""
    what = "the saved program" if isinstance(runner, ProgramRunner) else "the unfolded model"
    return ExportError(
        f"running {what} on a batch of {samples} failed: {type(exc).__name__}: {exc}"
    )
