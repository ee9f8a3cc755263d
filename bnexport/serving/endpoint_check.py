"""`bnexport check --url`: the parity gate against a live v2 endpoint.

The same engine as a file check (`bnexport.parity`): the same sized inputs, the same noise rule,
the same `ParityReport` and exit codes. The candidates are runners of bnexport's family that send
their rows to the endpoint (`RemoteRunner`):

* ``v2-http`` / ``v2-grpc`` — each batch as one request;
* ``v2-…-mixed`` — the same rows cut into requests of mixed sizes, sent concurrently so the server's
  batcher combines them with one another; the rows are put back in request order. A row whose
  output depends on which rows it was batched with (beyond fp32 noise), a missing response or one
  out of order fails it like any mismatch.

Before any inference the endpoint's metadata is checked against the reference: as many inputs
and outputs, the same non-batch dimensions, floating-point inputs, a batchable first dimension.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bnexport.errors import ParityInputError
from bnexport.limits import check_seconds
from bnexport.serving.client import RemoteRunner, V2Client
from bnexport.serving.defaults import DEFAULT_TIMEOUT_S
from bnexport.serving.graph_io import GraphIO

if TYPE_CHECKING:
    import numpy as np

    from bnexport.parity import CheckConfig, ParityReport
    from bnexport.progress import Progress

#: Request sizes the mixed runner cycles through, and how many requests it keeps in flight.
MIXED_SIZES: tuple[int, ...] = (1, 3, 2, 5, 1, 7, 4)
MIXED_CONCURRENCY = 8


@dataclass(frozen=True)
class Endpoint:
    """A model behind a v2 endpoint."""

    url: str
    name: str
    grpc: bool = False
    timeout: float = DEFAULT_TIMEOUT_S

    def __post_init__(self) -> None:
        check_seconds(self.timeout, "--timeout", positive=True)  # finite: a down server ends


class MixedBatchRunner(RemoteRunner):
    """Sends a batch as concurrent requests of mixed sizes and reassembles them in order."""

    def __init__(self, client: V2Client, model: str, io: GraphIO) -> None:
        super().__init__(client, model, io, name=f"v2-{client.protocol.lower()}-mixed")
        self.description = (
            f"model {model!r} at {client.url}: rows in concurrent requests of sizes "
            f"{','.join(map(str, MIXED_SIZES))}… (the server batches them together)"
        )

    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import numpy as np

        rows = len(next(iter(feed.values())))
        cuts, start, i = [], 0, 0
        while start < rows:
            size = MIXED_SIZES[i % len(MIXED_SIZES)]
            cuts.append((start, min(rows, start + size)))
            start, i = start + size, i + 1
        local = threading.local()

        def parent(part: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            # tritonclient's HTTP client runs on gevent: one client per thread
            if not hasattr(local, "client"):
                local.client = V2Client(
                    self.client.url, grpc=self.client.grpc, timeout=self.client.timeout
                )
                local.client.binary = self.client.binary
                clients.append(local.client)
            return RemoteRunner(local.client, self.model, self.io).infer(part)

        clients: list[V2Client] = []
        with ThreadPoolExecutor(MIXED_CONCURRENCY) as pool:
            parts = list(
                pool.map(lambda c: parent({k: v[c[0] : c[1]] for k, v in feed.items()}), cuts)
            )
        for client in clients:
            client.close()
        for (lo, hi), part in zip(cuts, parts, strict=True):
            for name, array in part.items():
                if len(array) != hi - lo:
                    raise ParityInputError(
                        f"{self.client.url}: rows {lo}..{hi - 1} came back as {len(array)} rows "
                        f"of {name!r}"
                    )
        return {name: np.concatenate([p[name] for p in parts]) for name in self.output_names}


def check_endpoint(
    endpoint: Endpoint,
    reference: Any,
    config: CheckConfig,
    *,
    normalize: Any = None,
    input_shape: Sequence[tuple[int, ...]] | None = None,
    reference_name: str = "",
    progress: Progress | None = None,
) -> ParityReport:
    """Compare the endpoint's model with the PyTorch ``reference`` (`EndpointError` when the
    endpoint cannot be used, `ParityInputError` when its metadata does not fit the reference)."""
    from bnexport.parity.check import parity_report
    from bnexport.parity.config import PreparedCheck
    from bnexport.parity.plan import build_sized_inputs
    from bnexport.parity.run import run_check
    from bnexport.signature import TensorSpec

    started = time.perf_counter()
    client = V2Client(endpoint.url, grpc=endpoint.grpc, timeout=endpoint.timeout)
    client.wait_ready(endpoint.name)
    io = client.metadata(endpoint.name)
    reference.eval()
    in_names = [t.name for t in io.inputs]
    out_names = [t.name for t in io.outputs]
    check_metadata(io, reference, input_shape, endpoint)
    in_specs = tuple(_spec(t, TensorSpec) for t in io.inputs)
    out_specs = tuple(_spec(t, TensorSpec) for t in io.outputs)
    ref_runner, gt_runner = _reference_runners(reference, in_names, out_names, config)
    candidates = [
        RemoteRunner(client, endpoint.name, io),
        MixedBatchRunner(client, endpoint.name, io),
    ]
    inputs, batch_sizes, plan = build_sized_inputs(
        ref_runner,
        in_specs,
        config,
        config.batch_sizes,
        normalize,
        input_shape,
        n_ort=len(candidates),
        truth_runner=gt_runner,
    )
    check = PreparedCheck(
        config=config,
        reference=reference,
        reference_name=reference_name,
        model_info={
            "path": f"{endpoint.url}/v2/models/{endpoint.name}",
            "url": endpoint.url,
            "name": endpoint.name,
            "protocol": client.protocol,
        },
        weights="not compared: the served file is not read",
        notes=[*plan, "the endpoint's weights are not fingerprinted: only its outputs are checked"],
        cuda_probe=None,
        use_cuda=False,
        skipped=[],
        in_specs=in_specs,
        out_specs=out_specs,
        ref_runner=ref_runner,
        gt_runner=gt_runner,
        torch_runners=[],
        ort_runners=candidates,  # type: ignore[arg-type]  # runners of the same family
        inputs=inputs,
        batch_sizes=batch_sizes,
    )
    try:
        results = run_check(check, progress)
    finally:
        client.close()
    return parity_report(check, results, time.perf_counter() - started)


def _reference_runners(
    reference: Any, in_names: list[str], out_names: list[str], config: CheckConfig
) -> tuple[Any, Any]:
    """The PyTorch fp32 reference and, unless ``--no-fp64``, the float64 truth."""
    from bnexport.runners import TorchRunner

    ref = TorchRunner(
        reference,
        in_names,
        out_names,
        name="torch-fp32",
        description="PyTorch fp32 on the CPU (the reference)",
    )
    if not config.ground_truth:
        return ref, None
    truth = TorchRunner(
        reference,
        in_names,
        out_names,
        name="torch-fp64",
        dtype="float64",
        gating=False,
        description="PyTorch float64 on the CPU (the truth)",
    )
    return ref, truth


def _spec(tensor: Any, spec_type: Callable[..., Any]) -> Any:
    import numpy as np

    from bnexport.serving.graph_io import V2_TO_NUMPY

    shape = tuple(d if d > 0 else None for d in tensor.shape)
    return spec_type(tensor.name, shape, np.dtype(V2_TO_NUMPY[tensor.datatype]))


def check_metadata(
    io: GraphIO, reference: Any, input_shape: Sequence[tuple[int, ...]] | None, where: Endpoint
) -> None:
    """The endpoint's inputs and outputs fit the reference (`ParityInputError` naming each)."""
    import torch

    from bnexport.signature import flatten_outputs

    problems: list[str] = []
    shapes = list(input_shape or [])
    if shapes and len(shapes) != len(io.inputs):
        problems.append(f"{len(io.inputs)} inputs, the reference takes {len(shapes)}")
    for tensor, shape in zip(io.inputs, shapes, strict=False):
        if tensor.datatype not in ("FP32", "FP16", "FP64"):
            problems.append(f"input {tensor.name!r} is {tensor.datatype}, not floating point")
        if not tensor.batch_dynamic:
            problems.append(f"input {tensor.name!r} has no batch dimension ({tensor.shape})")
        if not _fits(tensor.shape[1:], shape):
            problems.append(
                f"input {tensor.name!r} is {list(tensor.shape)}, the reference's "
                f"[-1,{','.join(map(str, shape))}]"
            )
    if shapes and not problems:
        with torch.inference_mode():
            out = reference(*[torch.zeros((1, *s)) for s in shapes])
        flat = flatten_outputs(out)
        if len(flat) != len(io.outputs):
            problems.append(f"{len(io.outputs)} outputs, the reference gives {len(flat)}")
        keys = [k for k, _ in flat]
        if all(k is not None for k in keys) and sorted(keys) != sorted(t.name for t in io.outputs):
            problems.append(f"outputs {[t.name for t in io.outputs]}, the reference's {keys}")
        for tensor, (_, value) in zip(io.outputs, flat, strict=False):
            if not _fits(tensor.shape[1:], tuple(value.shape[1:])):
                problems.append(
                    f"output {tensor.name!r} is {list(tensor.shape)}, the "
                    f"reference's [-1,{','.join(map(str, value.shape[1:]))}]"
                )
    if problems:
        raise ParityInputError(
            f"model {where.name!r} at {where.url} does not fit the reference: {'; '.join(problems)}"
        )


def _fits(served: Sequence[int], wanted: Sequence[int]) -> bool:
    return len(served) == len(wanted) and all(
        s in (-1, w) for s, w in zip(served, wanted, strict=True)
    )
