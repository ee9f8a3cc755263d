"""Measure the separation the noise-relative parity rule relies on: correct exports vs faults.

For the seed Net (``models/net.pt``) and the real models of ``tests/real/zoo.py`` (``--models``):

* inputs as `bnexport check` feeds them (bundled images for the Net; seeded random samples and the
  edge cases for the others; ``--random`` samples);
* the truth: the float64 forward of the unfolded model; the noise floor ``F``: fp32's error against
  it (`bnexport.noise.relative_error`, floored at ``NOISE_FLOOR_ULPS`` ulps) over PyTorch at batch
  32 and batch 1 and PyTorch with its long sums added in 8 lanes in order
  (`bnexport.parity.orders`); the old floor (PyTorch's two draws only) is measured too;
* **correct exports**, as `bnexport onnx` makes them (``fold_model`` + ``export_onnx``): the folded
  PyTorch module and onnxruntime CPU at every optimization level, at batch 1 and batch ``--batch``;
  each as ``E / F`` (a multiple of the noise floor);
* the **fold self-check**: a float64 copy folded in float64 against the truth, as
  ``E / (2⁻²⁹ · F)`` (the rule's ``ρ`` for float64);
* **faults** (``--faults`` models), on onnxruntime CPU ``all``, each as ``E / F``: one conv output
  channel scaled, and one conv bias nudged, so that their effect is ``--fault-target`` × the OLD
  floor (PyTorch's own error; calibrated: the effect of a 1e-2 change, measured, scaled linearly,
  then measured again), and where the new floor is above the old one, also × the new floor; the
  fold done without eps; one conv kernel transposed; one weight set to NaN; the temperature
  dropped (models that have one: the Net, handmade/two_input_net).

Prints a markdown table (model, F, worst correct export and where, self-check, each fault) on
stdout and writes every number to ``--json``; progress on stderr.

Usage::

    .venv/bin/python scripts/parity_separation.py [--models net torchvision/resnet18 …]
        [--faults net torchvision/resnet18 …] [--json parity_separation.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "parity"))

from parity_helpers import HandFolded  # noqa: E402  (the hand-folded Net of the parity tests)
from real.faults import (  # noqa: E402  (the faults the fault tests inject)
    ConvInitializers,
    calibrated,
    fold_without_eps,
    set_temperature,
)
from real.zoo import REAL_MODELS  # noqa: E402  (the zoo lives with its tests)

from bnexport.defaults import OPT_LEVELS  # noqa: E402
from bnexport.export import export_onnx  # noqa: E402
from bnexport.fold import fold_model  # noqa: E402
from bnexport.noise import (  # noqa: E402
    NOISE_FLOOR_ULPS,
    gated_candidate,
    noise_floor,
    order_floors,
    relative_error,
    worst_sample,
)
from bnexport.ort import SessionConfig, make_session  # noqa: E402
from bnexport.parity.inputs import InputConfig, build_inputs  # noqa: E402
from bnexport.parity.orders import lane_sums_mode  # noqa: E402
from bnexport.signature import TensorSpec, name_outputs  # noqa: E402
from bnexport.source import load_source  # noqa: E402

EPS32 = float(np.finfo(np.float32).eps)
RHO64 = float(np.finfo(np.float64).eps) / EPS32
NET = "net"
DEFAULT_MODELS = (
    NET,
    "torchvision/resnet50",
    "torchvision/mobilenet_v2",
    "torchvision/efficientnet_b0",
    "torchvision/googlenet",
    "torchvision/shufflenet_v2_x1_0",
    "torchvision/mnasnet0_5",
    "torchvision/regnet_y_400mf",
    "torchvision/inception_v3",
    "timm/efficientnet_b0",
    "timm/resnetv2_50",
    "timm/rexnet_100",
    "timm/mixnet_s",
    "handmade/two_input_net",
    # long reductions (global pools over big maps, attention softmax, layer norms)
    "handmade/conv_gap",
    "timm/levit_128s",
    "timm/efficientformerv2_s0",
    "torchvision/convnext_tiny",
    "torchvision/efficientnet_v2_s",
    "timm/ghostnetv2_100",
)
DEFAULT_FAULTS = (
    NET,
    "torchvision/resnet18",
    "torchvision/mobilenet_v2",
    "torchvision/shufflenet_v2_x1_0",
    "handmade/two_input_net",
    "handmade/conv_gap",
    "timm/levit_128s",
)
#: A new floor this many times the old one gets faults calibrated to it too.
RAISED = 1.5


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Case:
    """A model, its example inputs, ONNX names and the inputs `bnexport check` would feed."""

    def __init__(self, name: str, n_random: int) -> None:
        self.name = name
        if name == NET:
            src = load_source(ROOT / "models" / "net.pt")
            self.model, self.example = src.model, tuple(src.example_inputs)
            self.in_names, self.out_names = list(src.input_names), list(src.output_names or [])
            self.normalize = src.normalize
            self.temperature = src.temperature
        else:
            self.model, self.example = REAL_MODELS[name]()
            self.in_names, self.out_names = [], []
            self.normalize = None
            self.temperature = getattr(self.model, "temperature", None)
        self.model.eval()
        self.n_random = n_random

    def export(self, module: torch.nn.Module, path: Path) -> bytes:
        res = export_onnx(
            module,
            self.example,
            path,
            input_names=self.in_names or None,
            output_names=self.out_names or None,
            fuse_batchnorm=True,
        )
        self.in_names, self.out_names = list(res.input_names), list(res.output_names)
        return path.read_bytes()

    def feed(self, data: bytes) -> dict[str, np.ndarray]:
        sess = make_session(data, SessionConfig(provider="cpu", intra_op_num_threads=1))
        specs = [TensorSpec.from_ort(n) for n in sess.get_inputs()]
        shapes = [tuple(x.shape[1:]) for x in self.example]
        cfg = InputConfig(bundled=self.name == NET, random_count=self.n_random)
        inputs = build_inputs(specs, cfg, normalize=self.normalize, input_shape=shapes)
        self.edge = inputs.edge_case_mask()
        self.locate = inputs.locate
        return inputs.arrays()


def torch_forward(
    model: torch.nn.Module,
    feed: dict[str, np.ndarray],
    names: Sequence[str],
    dtype: torch.dtype,
    batch: int = 32,
) -> dict[str, np.ndarray]:
    xs = [
        torch.from_numpy(feed[n].copy()).to(dtype)
        if feed[n].dtype.kind == "f"
        else torch.from_numpy(feed[n].copy())
        for n in feed
    ]
    outs: dict[str, list[np.ndarray]] = {}
    n = xs[0].shape[0]
    with torch.inference_mode():
        for start in range(0, n, batch):
            got = name_outputs(model(*(x[start : start + batch] for x in xs)), names, "torch")
            for k, v in got.items():
                outs.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in outs.items()}


def ort_forward(
    data: bytes, feed: dict[str, np.ndarray], level: str = "all", batch: int = 32
) -> dict[str, np.ndarray]:
    sess = make_session(
        data, SessionConfig(provider="cpu", graph_optimization_level=level, intra_op_num_threads=1)
    )
    names = [o.name for o in sess.get_outputs()]
    n = next(iter(feed.values())).shape[0]
    outs: dict[str, list[np.ndarray]] = {k: [] for k in names}
    for start in range(0, n, batch):
        got = sess.run(None, {k: v[start : start + batch] for k, v in feed.items()})
        for k, v in zip(names, got, strict=True):
            outs[k].append(v)
    return {k: np.concatenate(v) for k, v in outs.items()}


def ratio(
    cand: dict[str, np.ndarray],
    truth: dict[str, np.ndarray],
    floor: dict[str, Any],
    ungated: dict[str, np.ndarray],
) -> float:
    """The worst output's ``E / F``, ill-conditioned edge cases left out as `bnexport check`
    leaves them out (`bnexport.noise.noise_floor`); ``floor[k]`` one value, or one per sample
    (`bnexport.noise.order_floors`: the worst ``Eᵢ / Nᵢ``)."""
    worst = 0.0
    for k in truth:
        gated = gated_candidate(cand[k], truth[k], ungated[k])
        if np.ndim(floor[k]):
            e, n = worst_sample(gated, truth[k], floor[k], EPS32)
            worst = max(worst, e.value / max(n, NOISE_FLOOR_ULPS * EPS32))
        else:
            worst = max(worst, relative_error(gated, truth[k]).value / floor[k])
    return worst


def faults(
    case: Case,
    data: bytes,
    feed: dict[str, np.ndarray],
    truth: dict[str, np.ndarray],
    floors: dict[str, dict[str, float]],
    ungated: dict[str, np.ndarray],
    target: float,
    tmp: Path,
) -> dict[str, float]:
    """Each fault as ``E / F`` under the new floor; the calibrated ones sized to ``target`` × the
    old floor (``channel``, ``bias``) and, where the new floor is raised, × the new one too
    (``channel_new``, ``bias_new``)."""
    convs = ConvInitializers(data)
    out: dict[str, float] = {}
    new = floors["new"]

    def effect(model: bytes, floor: dict[str, float] = new) -> float:
        return ratio(ort_forward(model, feed), truth, floor, ungated)

    raised = max(float(np.max(new[k])) / floors["old"][k] for k in new) > RAISED
    for key, edit in (("channel", convs.channel_scaled), ("bias", convs.bias_nudged)):
        delta, out[f"{key}_old"] = calibrated(
            lambda d, edit=edit: effect(edit(d), floors["old"]), target
        )
        out[key] = effect(edit(delta))
        if raised:
            _, out[f"{key}_new"] = calibrated(lambda d, edit=edit: effect(edit(d)), target)
    out["transposed"] = effect(convs.transposed())
    out["nan"] = effect(convs.nan())
    if case.name == NET:  # its BN is matched by what it computes: fold it by hand with eps = 0
        no_eps: torch.nn.Module = HandFolded(case.model, eps=0.0)
    else:
        with fold_without_eps():
            no_eps = fold_model(case.model, case.example, verify=False).module
    out["no_eps"] = effect(case.export(no_eps, tmp / "noeps.onnx"))
    if case.temperature is not None and case.temperature != 1.0:
        cold = copy.deepcopy(case.model)
        set_temperature(cold, 1.0)
        folded = fold_model(cold, case.example, verify=False).module
        out["no_temperature"] = effect(case.export(folded, tmp / "cold.onnx"))
    return out


def measure(name: str, args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    case = Case(name, args.random)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        folded = fold_model(case.model, case.example, verify=False).module
        data = case.export(folded, tmp / "model.onnx")
        feed = case.feed(data)
        names = case.out_names
        truth = torch_forward(copy.deepcopy(case.model).double(), feed, names, torch.float64)
        # The noise floor as `bnexport check` measures it: fp32's error over PyTorch's own two
        # execution paths (batch 1 and batch 32 pick different kernels) and PyTorch with its long
        # sums in another order; the old floor without the last.
        ref = torch_forward(case.model, feed, names, torch.float32)
        ref1 = torch_forward(case.model, feed, names, torch.float32, batch=1)
        with lane_sums_mode():
            reordered = torch_forward(case.model, feed, names, torch.float32)
        floors = {k: noise_floor([ref[k], ref1[k]], truth[k], case.edge) for k in names}
        noise = {k: n for k, (n, _) in floors.items()}
        ungated = {k: u for k, (_, u) in floors.items()}
        floor_old = {k: max(noise[k], NOISE_FLOOR_ULPS * EPS32) for k in names}
        floor = {k: order_floors([reordered[k]], truth[k], noise[k]) for k in names}
        row: dict[str, Any] = {
            "model": name,
            "samples": int(next(iter(feed.values())).shape[0]),
            "noise_old": noise,
            "noise": {k: float(np.max(f[~ungated[k]])) for k, f in floor.items()},
            "raised": {k: int((f > noise[k]).sum()) for k, f in floor.items()},
            "ungated": sorted(
                {case.locate(int(i))[0] for u in ungated.values() for i in np.flatnonzero(u)}
            ),
            "correct": {},
        }
        row["correct_old"] = {}
        candidates = {"torch-folded": torch_forward(folded, feed, names, torch.float32)}
        for level in OPT_LEVELS:
            for batch in (1, args.batch):
                candidates[f"ort-{level}-b{batch}"] = ort_forward(data, feed, level, batch)
        for where, got in candidates.items():
            row["correct"][where] = ratio(got, truth, floor, ungated)
            row["correct_old"][where] = ratio(got, truth, floor_old, ungated)
        work64 = copy.deepcopy(case.model).double()
        ex64 = tuple(x.double() if x.is_floating_point() else x for x in case.example)
        folded64 = fold_model(work64, ex64, verify=False).module
        got64 = torch_forward(folded64, feed, names, torch.float64)
        row["self_check"] = ratio(
            got64, truth, {k: RHO64 * f for k, f in floor_old.items()}, ungated
        )
        if name in args.faults:
            both = {"old": floor_old, "new": floor}
            row["faults"] = faults(case, data, feed, truth, both, ungated, args.fault_target, tmp)
    row["seconds"] = time.perf_counter() - t0
    worst = max(row["correct"], key=row["correct"].get)
    log(
        f"{name}: F {max(floor_old.values()):.3g} (raised to {max(row['noise'].values()):.3g} on "
        f"{sum(row['raised'].values())} samples), "
        f"worst correct {row['correct'][worst]:.3g} ({worst}), "
        f"self-check {row['self_check']:.3g}, faults {row.get('faults', {})} "
        f"({row['seconds']:.0f} s)"
    )
    return row


def table(rows: list[dict[str, Any]]) -> str:
    kinds = ("channel", "bias", "no_eps", "transposed", "nan", "no_temperature")
    head = (
        "| model | samples | N old | N | worst correct E/F | where | E/F old | fold self-check | "
        + " | ".join(kinds)
        + " | channel, bias at 8×F |"
    )
    lines = [head, "|" + " --- |" * (8 + len(kinds) + 1)]
    for r in rows:
        worst = max(r["correct"], key=r["correct"].get)
        worst_old = max(r["correct_old"].values())
        f = r.get("faults", {})
        cells = [f"{f[k]:.3g}" if k in f else "" for k in kinds]
        at_new = f"{f['channel_new']:.3g}, {f['bias_new']:.3g}" if "channel_new" in f else ""
        lines.append(
            f"| {r['model']} | {r['samples']} | {max(r['noise_old'].values()):.3g} | "
            f"{max(r['noise'].values()):.3g} | {r['correct'][worst]:.3g} | {worst} | "
            f"{worst_old:.3g} | {r['self_check']:.3g} | " + " | ".join(cells) + f" | {at_new} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=list(DEFAULT_MODELS))
    parser.add_argument("--faults", nargs="*", default=list(DEFAULT_FAULTS))
    parser.add_argument("--random", type=int, default=16, help="random samples per model")
    parser.add_argument("--batch", type=int, default=8, help="the larger onnxruntime batch")
    parser.add_argument("--fault-target", type=float, default=8.0, help="fault effect, × F")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    models = list(dict.fromkeys([*args.models, *[f for f in args.faults if f in args.models]]))
    models += [f for f in args.faults if f not in models]
    rows = []
    for name in models:
        log(f"{name} …")
        try:
            rows.append(measure(name, args))
        except Exception as exc:  # record and go on
            log(f"{name}: FAILED {type(exc).__name__}: {exc}")
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
    print(table(rows))
    print(f"\ntorch {torch.__version__}; {args.random} random samples + edge cases per model")


if __name__ == "__main__":
    main()
