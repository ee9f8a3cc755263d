"""Faults injected into one layer of a correct export, for localization's acceptance set
(``scripts/localize_faults.py`` runs every case and prints the table; ``test_real_localize.py``
holds a subset).

Each model is exported twice as `bnexport onnx` does it: folded (``fold_model`` + ``export_onnx``)
and unfolded (``--no-fold``: its BatchNormalization nodes stay). Kinds:

* ``channel``: one output channel ``c`` of a (folded) conv's weight scaled by ``1 + δ``, and
* ``bias``: that conv's bias ``c`` shifted by ``δ · max(1, max|b|)``, each with ``δ`` calibrated
  so that the check's onnxruntime runner errs `TARGET` = 8× the output's noise floor (as the
  fault tests do: the effect of δ = 1e-2 measured and δ scaled linearly, repeated until the
  effect is within 1.25× of 8: squeeze-excite gates are not linear in δ): the mildest fault the
  gate catches; ``c`` is the channel whose weights move its output most;
* ``node``: one activation node replaced: Relu → LeakyRelu(0.01), Sigmoid → HardSigmoid(1/6, ½),
  HardSwish → x·HardSigmoid(1/5, ½) (the sites: activations whose output, or whose consumer's,
  is a module's output in the file's table);
* ``eps``: a BatchNormalization node of the unfolded file gets ``eps + 1e-2 · median(var)``.

Sites are taken early, in the middle and late (the 10th, 50th and 90th percentile of the sites of
that kind, in graph order). The expected answer is the module the edited node computes (by the
file's own table), or a module of the fold chain containing it (the conv, its BatchNorm or a
module inside that BatchNorm, e.g. timm's ``BatchNormAct2d.act``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from real.faults import CALIBRATION_STEP
from real.zoo import REAL_MODELS

from bnexport.export import export_onnx
from bnexport.fold import fold_model
from bnexport.parity import CheckConfig, InputConfig
from bnexport.parity.check import parity_report
from bnexport.parity.localize import localize
from bnexport.parity.onnx_graph import marked_copy, read_graph
from bnexport.parity.prepare import prepare_check
from bnexport.parity.run import run_check
from bnexport.scopes import MODULE_OUTPUTS_KEY, decode_table

ROOT = Path(__file__).resolve().parents[2]
NET = "net"
#: The acceptance set: torchvision resnet18, mobilenet_v3_small, efficientnet_b0, two timm
#: families (ResNet-D, ReXNet) and the shipped Net.
MODELS = (
    NET,
    "torchvision/resnet18",
    "torchvision/mobilenet_v3_small",
    "torchvision/efficientnet_b0",
    "timm/resnet18d",
    "timm/rexnet_100",
)
KINDS = ("channel", "bias", "node", "eps")
POSITIONS = {"early": 0.1, "middle": 0.5, "late": 0.9}
TARGET = 8.0  # a calibrated fault's effect on the gate, in the output's noise floors
ACTIVATIONS = ("Relu", "Sigmoid", "HardSwish")


def check_config(localize_mode: str = "always") -> CheckConfig:
    """A small, fixed check: 8 random samples and the edge cases, batch 1, onnxruntime ``all``."""
    return CheckConfig(
        samples=8,
        batch_sizes=(1,),
        opt_levels=("all",),
        inputs=InputConfig(bundled=False),
        localize=localize_mode,
    )


@dataclass
class Prepared:
    """A model, its fold, and its folded and unfolded exports (bytes)."""

    name: str
    model: torch.nn.Module
    example: tuple[torch.Tensor, ...]
    fold: Any
    folded: bytes
    unfolded: bytes

    def check(self, data: bytes, *, strategy: str | None = "auto") -> Any:
        """`check_parity`'s stages with the fault set's config, localized with ``strategy``
        (None: not localized)."""
        config = check_config()
        check = prepare_check(
            data,
            self.model,
            config,
            normalize=None,
            input_shape=[tuple(x.shape[1:]) for x in self.example],
            folded=self.fold.module,
            folded_reason="",
            reference_name=self.name,
            rebuild=None,
        )
        results = run_check(check, None)
        report = parity_report(check, results, 0.0)
        if strategy is None:
            return report
        report.layers = localize(
            data,
            check,
            results,
            fold_report=self.fold.report,
            folded=self.fold.module,
            requested=True,
            strategy=strategy,
        )
        return report


def prepare(name: str, folder: Path) -> Prepared:
    """Build ``name`` (the Net from ``models/net.pt``, else a zoo model) and export it twice."""
    if name == NET:
        from bnexport.source import load_source

        src = load_source(ROOT / "models" / "net.pt")
        model, example = src.model.eval(), tuple(src.example_inputs)
    else:
        model, example = REAL_MODELS[name]()
    fold = fold_model(model, example, verify=False)
    stem = name.replace("/", "_")
    folded = folder / f"{stem}.onnx"
    unfolded = folder / f"{stem}-unfolded.onnx"
    export_onnx(fold.module, example, folded, metadata={"folded": "true"})
    export_onnx(model, example, unfolded, metadata={"folded": "false"})
    return Prepared(name, model, example, fold, folded.read_bytes(), unfolded.read_bytes())


@dataclass
class Fault:
    """One injected fault, its file and what localization should name."""

    model: str
    kind: str
    position: str
    site: str  # the ONNX node edited
    data: bytes
    expected: set[str]  # module paths (a reported layer under one of them counts too)
    detail: str = ""
    result: dict[str, Any] = field(default_factory=dict)

    def judge(self, report: Any) -> None:
        """Record what localization reported and whether it is the injected module."""
        loc = report.layers
        first = loc.first_failing if loc is not None else None
        reported = [] if first is None else [first.layer.key, *first.layer.aliases]
        modules = {k.split("@")[0] for k in reported}
        hit = any(m == e or m.startswith(e + ".") for m in modules for e in self.expected)
        self.result = {
            "reported": first.layer.key if first else None,
            "ratio": None if first is None else first.comparison.noise_ratio,
            "hit": hit,
            "gate_failed": not report.passed,
            "sessions": 0 if loc is None else loc.sessions,
            "seconds": 0.0 if loc is None else loc.seconds,
            "strategy": None if loc is None else loc.strategy,
        }


def _table(data: bytes) -> dict[str, list[str]]:
    proto = onnx.load_model_from_string(data)
    meta = {p.key: p.value for p in proto.metadata_props}
    owners: dict[str, list[str]] = {}
    for row in decode_table(meta[MODULE_OUTPUTS_KEY]):
        owners.setdefault(row.value, []).append(row.module)
    return owners


def _pick(sites: list[Any], positions: Sequence[str] = tuple(POSITIONS)) -> dict[str, Any]:
    """The early, middle and late site (fewer when there are fewer sites)."""
    picked: dict[str, Any] = {}
    for position in positions:
        q = POSITIONS[position]
        site = sites[min(len(sites) - 1, int(q * len(sites)))]
        if all(site is not s for s in picked.values()):
            picked[position] = site
    return picked


def _edited(data: bytes, edit: Callable[[onnx.ModelProto], None]) -> bytes:
    proto = onnx.load_model_from_string(data)
    edit(proto)
    return proto.SerializeToString()


def _chain_modules(prep: Prepared, conv: str) -> set[str]:
    """The conv and the BatchNorms folded into it (fold report)."""
    out = {conv}
    for e in prep.fold.report.entries:
        if e.status == "folded" and conv in (e.into, e.new_module):
            out |= {e.bn, e.into}
    return out


def conv_faults(
    prep: Prepared,
    positions: Sequence[str] = tuple(POSITIONS),
    kinds: Sequence[str] = ("channel", "bias"),
) -> list[Fault]:
    """``channel`` and ``bias`` faults on the folded file's convs, each calibrated so that the
    gate sees it at `TARGET` × the output's noise floor."""
    proto = onnx.load_model_from_string(prep.folded)
    owners = _table(prep.folded)
    inits = {i.name: i for i in proto.graph.initializer}
    convs = [
        n
        for n in proto.graph.node
        if n.op_type == "Conv" and len(n.input) > 2 and n.output[0] in owners
    ]
    faults = []
    for position, node in _pick(convs, positions).items():
        y = _value_on_inputs(prep, node.output[0])  # [samples, C, …] on data-like inputs
        bias = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
        moving = np.abs(y - bias.reshape(1, -1, *([1] * (y.ndim - 2))))
        c = int(np.argmax(moving.reshape(*moving.shape[:2], -1).max(axis=(0, 2))))
        conv = max(owners[node.output[0]], key=len)  # the conv (not a container of it)
        expected = _chain_modules(prep, conv)
        unit = max(1.0, float(np.abs(bias).max()))
        edits: dict[str, tuple[str, Callable[[np.ndarray, float], np.ndarray]]] = {
            "channel": (node.input[1], lambda a, d, c=c: _scaled(a, c, d)),
            "bias": (node.input[2], lambda a, d, c=c, u=unit: _shifted(a, c, d * u)),
        }
        for kind, (name, edit) in edits.items():
            if kind not in kinds:
                continue

            def make(d: float, name: str = name, edit: Any = edit) -> bytes:
                return _edited(prep.folded, lambda p: _edit_init(p, name, lambda a: edit(a, d)))

            delta, effect = calibrate(lambda d, make=make: gate_effect(prep, make(d)))
            detail = f"{conv} {kind} {c} δ={delta:.2g} (gate {effect:.3g}×)"
            faults.append(
                Fault(prep.name, kind, position, node.name, make(delta), expected, detail)
            )
    return faults


def _scaled(a: np.ndarray, c: int, delta: float) -> np.ndarray:
    a = a.copy()
    a[c] = (a[c].astype(np.float64) * (1 + delta)).astype(a.dtype)
    return a


def _shifted(a: np.ndarray, c: int, shift: float) -> np.ndarray:
    a = a.copy()
    a[c] = np.float32(float(a[c]) + shift)
    return a


def _edit_init(proto: onnx.ModelProto, name: str, edit: Callable[[np.ndarray], np.ndarray]) -> None:
    for init in proto.graph.initializer:
        if init.name == name:
            init.CopyFrom(numpy_helper.from_array(edit(numpy_helper.to_array(init)), name))
            return
    raise KeyError(name)


def _value_on_inputs(prep: Prepared, value: str) -> np.ndarray:
    """``value`` of the clean folded file on a few random inputs (onnxruntime)."""
    from bnexport.ort import SessionConfig, make_session

    proto = onnx.load_model_from_string(prep.folded)
    view = read_graph(proto)
    session = make_session(marked_copy(proto, [value], view.dtypes), SessionConfig(provider="cpu"))
    gen = torch.Generator().manual_seed(0)
    feed = {
        i.name: torch.randn(8, *x.shape[1:], generator=gen).numpy()
        for i, x in zip(session.get_inputs(), prep.example, strict=True)
    }
    names = [o.name for o in session.get_outputs()]
    return session.run(None, feed)[names.index(value)].astype(np.float64)


def node_faults(prep: Prepared, positions: Sequence[str] = tuple(POSITIONS)) -> list[Fault]:
    """One activation replaced, early / middle / late, in the folded file."""
    proto = onnx.load_model_from_string(prep.folded)
    owners = _table(prep.folded)
    consumers: dict[str, list[Any]] = {}
    for n in proto.graph.node:
        for v in n.input:
            consumers.setdefault(v, []).append(n)
    sites = []
    for n in proto.graph.node:
        if n.op_type not in ACTIVATIONS:
            continue
        value = n.output[0]
        if value not in owners and len(consumers.get(value, [])) == 1:
            value = consumers[value][0].output[0]  # SiLU: Sigmoid → Mul
        if value in owners:
            sites.append((n, set(owners[value])))
    faults = []
    for position, (node, expected) in _pick(sites, positions).items():
        faults.append(
            Fault(
                prep.name,
                "node",
                position,
                node.name,
                _edited(prep.folded, lambda p, name=node.name: _replace(p, name)),
                expected,
                f"{node.op_type} {node.name} replaced",
            )
        )
    return faults


def _replace(proto: onnx.ModelProto, name: str) -> None:
    """Relu → LeakyRelu(0.01); Sigmoid → HardSigmoid(1/6, ½); HardSwish → x·HardSigmoid(1/5, ½)."""
    nodes = proto.graph.node
    i = next(k for k, n in enumerate(nodes) if n.name == name)
    node = nodes[i]
    if node.op_type == "Relu":
        new = [helper.make_node("LeakyRelu", node.input, node.output, name=name, alpha=0.01)]
    elif node.op_type == "Sigmoid":
        new = [helper.make_node("HardSigmoid", node.input, node.output, name=name, alpha=1 / 6)]
    else:
        gate = f"{name}_gate"
        new = [
            helper.make_node("HardSigmoid", node.input, [gate], name=gate, alpha=0.2),
            helper.make_node("Mul", [node.input[0], gate], node.output, name=name),
        ]
    del nodes[i]
    for k, n in enumerate(new):
        nodes.insert(i + k, n)


def eps_faults(prep: Prepared, positions: Sequence[str] = tuple(POSITIONS)) -> list[Fault]:
    """A BatchNormalization node's eps raised, early / middle / late, in the unfolded file."""
    proto = onnx.load_model_from_string(prep.unfolded)
    owners = _table(prep.unfolded)
    inits = {i.name: i for i in proto.graph.initializer}
    sites = [
        n for n in proto.graph.node if n.op_type == "BatchNormalization" and n.output[0] in owners
    ]
    faults = []
    for position, node in _pick(sites, positions).items():
        var = numpy_helper.to_array(inits[node.input[4]])
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        new_eps = eps + 1e-2 * float(np.median(var))

        def edit(p: onnx.ModelProto, name=node.name, e=new_eps) -> None:
            n = next(x for x in p.graph.node if x.name == name)
            for a in n.attribute:
                if a.name == "epsilon":
                    a.f = e
                    return
            n.attribute.append(helper.make_attribute("epsilon", e))

        faults.append(
            Fault(
                prep.name,
                "eps",
                position,
                node.name,
                _edited(prep.unfolded, edit),
                set(owners[node.output[0]]),
                f"eps {eps:g} → {new_eps:.3g}",
            )
        )
    return faults


#: Calibration stops within this factor of `TARGET` (or after `CALIBRATION_ROUNDS` steps).
CALIBRATION_SPREAD = 1.25
CALIBRATION_ROUNDS = 5


def calibrate(measure: Callable[[float], float]) -> tuple[float, float]:
    """``(δ, effect at δ)`` with the effect near `TARGET`: δ scaled by ``TARGET / effect`` from
    `CALIBRATION_STEP` until it lands within `CALIBRATION_SPREAD` (a gate behind a saturating
    gate, e.g. squeeze-excite, is not linear in δ: one linear step can land at 1×)."""
    delta = CALIBRATION_STEP
    effect = measure(delta)
    for _ in range(CALIBRATION_ROUNDS):
        if TARGET / CALIBRATION_SPREAD <= effect <= TARGET * CALIBRATION_SPREAD:
            break
        delta *= TARGET / max(effect, 1e-300)
        effect = measure(delta)
    return delta, effect


def gate_effect(prep: Prepared, data: bytes) -> float:
    """The onnxruntime runner's worst error as a multiple of the output's noise floor."""
    report = prep.check(data, strategy=None)
    return max(
        o.noise_ratio or 0.0
        for r in report.results
        if r.runner.startswith("ort-")
        for o in r.outputs
    )


def all_faults(prep: Prepared) -> list[Fault]:
    """Every fault of every kind for ``prep``."""
    return [*conv_faults(prep), *node_faults(prep), *eps_faults(prep)]
