"""Measure a batch-size-aware export: does running a large batch in chunks hold batch-64 throughput?

At batch 256 the shipped Net's 32×28×28 activation (25.7 MB per batch, written twice on the NCHWc
path) no longer fits the 32 MB L3, and throughput halves against batch 64. Two graph rewrites of
bnexport's folded export (same weights, same ops per image) keep the working set at one chunk:

* ``scan64`` — the input reshaped to ``[B/64, 64, …]``, a ``Scan`` runs the original graph on one
  chunk of 64 per iteration, the outputs reshaped back (dynamic batch, a multiple of 64);
* ``split64`` — a static batch ``B``, ``Split`` into ``B/64`` chunks, the graph copied per chunk
  (nodes emitted chunk by chunk, so the sequential executor finishes a chunk before the next),
  ``Concat``.

Each runs at onnxruntime's defaults (level ``all``; ``scan64`` and the plain file also at
``extended``), timed with bench's interleaved, paired, cooled-down rounds
(`bnexport.timing.measure_interleaved`). Printed per batch: images/s, the paired ratio against the
plain file at the same batch, and the paired ratio of throughput against the plain file at batch 64
(1.0 = batch-64 throughput held). Outputs are checked against the plain file first.

Usage::

    .venv/bin/bnexport onnx models/net.pt -o net.onnx --no-check
    .venv/bin/python scripts/batch_chunk.py net.onnx [--threads N] [--repeats 15] [--batches 256]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from bnexport.runners import OnnxRuntimeRunner
from bnexport.timing import TimingConfig, measure_interleaved, paired_ratio

CHUNK = 64


def scan_model(base: onnx.ModelProto, chunk: int = CHUNK) -> onnx.ModelProto:
    """``base`` (one input, one output, batch first) run by a Scan over chunks of ``chunk``."""
    body = copy.deepcopy(base.graph)
    body.name = "chunk"
    inits = list(body.initializer)  # outer-scope values: the body reads them by name
    del body.initializer[:]
    body.input[0].type.tensor_type.shape.dim[0].dim_value = chunk
    body.output[0].type.tensor_type.shape.dim[0].dim_value = chunk
    in_dims = [d.dim_value for d in base.graph.input[0].type.tensor_type.shape.dim[1:]]
    out_dims = [d.dim_value for d in base.graph.output[0].type.tensor_type.shape.dim[1:]]
    shape_in = numpy_helper.from_array(np.array([-1, chunk, *in_dims], np.int64), "chunk_in")
    shape_out = numpy_helper.from_array(np.array([-1, *out_dims], np.int64), "chunk_out")
    x, y = base.graph.input[0].name, base.graph.output[0].name
    nodes = [
        helper.make_node("Reshape", [x, "chunk_in"], ["chunks"]),
        helper.make_node("Scan", ["chunks"], ["chunk_outs"], num_scan_inputs=1, body=body),
        helper.make_node("Reshape", ["chunk_outs", "chunk_out"], [y]),
    ]
    graph = helper.make_graph(
        nodes,
        "scan",
        list(base.graph.input),
        list(base.graph.output),
        [*inits, shape_in, shape_out],
    )
    model = helper.make_model(graph, opset_imports=base.opset_import)
    model.ir_version = base.ir_version
    return model


def split_model(base: onnx.ModelProto, batch: int, chunk: int = CHUNK) -> onnx.ModelProto:
    """``base`` at a static ``batch``: Split into chunks, one copy of the graph each, Concat."""
    g = base.graph
    x, y = g.input[0].name, g.output[0].name
    k = batch // chunk
    nodes = [helper.make_node("Split", [x, "splits"], [f"{x}_{i}" for i in range(k)], axis=0)]
    for i in range(k):
        rename = {x: f"{x}_{i}"}
        for node in g.node:
            new = copy.deepcopy(node)
            new.name = f"{node.name}_{i}"
            new.input[:] = [rename.get(t, t) for t in node.input]
            for t in node.output:
                rename[t] = f"{t}_{i}"
            new.output[:] = [rename[t] for t in node.output]
            nodes.append(new)
    nodes.append(helper.make_node("Concat", [f"{y}_{i}" for i in range(k)], [y], axis=0))
    inp, out = copy.deepcopy(g.input[0]), copy.deepcopy(g.output[0])
    inp.type.tensor_type.shape.dim[0].dim_value = batch
    out.type.tensor_type.shape.dim[0].dim_value = batch
    splits = numpy_helper.from_array(np.full(k, chunk, np.int64), "splits")
    graph = helper.make_graph(nodes, "split", [inp], [out], [*g.initializer, splits])
    model = helper.make_model(graph, opset_imports=base.opset_import)
    model.ir_version = base.ir_version
    return model


def session(model: onnx.ModelProto, threads: int, level: str = "all") -> Any:
    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    }[level]
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


class _Fed:
    """A runner with its own feed (the batch-64 reference runs beside the large batch)."""

    def __init__(self, name: str, sess: Any, feed: dict[str, np.ndarray]) -> None:
        self.name = name
        self.runner = OnnxRuntimeRunner.wrap(sess, name=name)
        self.feed = feed

    def prepare(self, batch: Any) -> Callable[[], Any]:
        return self.runner.prepare(self.feed)


def measure(base: onnx.ModelProto, batch: int, threads: int, repeats: int) -> None:
    rng = np.random.default_rng(0)
    name = base.graph.input[0].name
    shape = [d.dim_value for d in base.graph.input[0].type.tensor_type.shape.dim[1:]]
    x64 = {name: rng.standard_normal((CHUNK, *shape), dtype=np.float32)}
    x = {name: rng.standard_normal((batch, *shape), dtype=np.float32)}
    runs = {
        "plain@64": (session(base, threads), x64),
        "plain": (session(base, threads), x),
        "plain extended": (session(base, threads, "extended"), x),
        "scan64": (session(scan_model(base), threads), x),
        "scan64 extended": (session(scan_model(base), threads, "extended"), x),
        "split64": (session(split_model(base, batch), threads), x),
    }
    want = runs["plain"][0].run(None, x)[0]
    for key, (sess, feed) in runs.items():
        if key != "plain@64":
            diff = float(np.abs(sess.run(None, feed)[0] - want).max())
            assert diff <= 1e-4 * float(np.abs(want).max()), (key, diff)
    runners = [_Fed(k, s, f) for k, (s, f) in runs.items()]
    raw = measure_interleaved(runners, {batch: x}, TimingConfig(repeats))
    t = {k: raw[(k, batch)][0] for k in runs}
    for key in runs:
        size = CHUNK if key == "plain@64" else batch
        ips = size / statistics.median(t[key])
        vs_plain = paired_ratio(t["plain"], t[key])
        held = paired_ratio([a * size / CHUNK for a in t["plain@64"]], t[key])
        print(
            f"| {batch} | {key} | {ips:,.0f} | {vs_plain.median:.3f} "
            f"[{vs_plain.p10:.3f}–{vs_plain.p90:.3f}] | {held.median:.3f} "
            f"[{held.p10:.3f}–{held.p90:.3f}] |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("onnx", help="bnexport's export (one input, one output, batch first)")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: ORT's)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batches", default="256,1024")
    args = parser.parse_args()
    base = onnx.load(args.onnx)
    print(f"threads {args.threads}, load average before {os.getloadavg()}")
    print("| batch | variant | images/s | × plain, same batch | × plain at batch 64 |")
    print("| ---: | --- | ---: | ---: | ---: |")
    for b in (int(s) for s in args.batches.split(",")):
        measure(base, b, args.threads, args.repeats)
    print(f"load average after {os.getloadavg()}")


if __name__ == "__main__":
    main()
