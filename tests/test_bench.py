"""`bnexport.bench`: FLOP counts against hand formulas, its config, and one tiny run.

The run's figures are re-derived here with numpy from the raw per-repeat times (medians, paired
ratios, images/s, GFLOP/s), so a wrong summary in the library cannot agree with itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from reference import randomize_net_state
from torch import nn

from bnexport.bench import (
    BASELINE,
    BNEXPORT_CPU,
    BNEXPORT_CUDA,
    REFERENCE_EXPORT,
    BenchConfig,
    BenchReport,
    count_flops,
    run_bench,
)
from bnexport.checkpoint import save_checkpoint
from bnexport.data import FASHION_MNIST_NORMALIZE
from bnexport.errors import BnexportError
from bnexport.machine import cpu_model
from bnexport.nets import Net
from bnexport.source import load_source

# --------------------------------------------------------------------------------------------
# FLOPs


def test_net_flops_match_the_hand_formula() -> None:
    # conv1: 32 output channels x 28x28 pixels x (1 input channel x 3x3) MACs; fc1: 25088 x 10 MACs.
    conv = 32 * 28 * 28 * 1 * 3 * 3
    fc = 32 * 28 * 28 * 10
    count = count_flops(Net(), (1, 28, 28))
    assert count.per_image == 2 * (conv + fc) == 953_344
    assert [(layer.name, layer.kind, layer.flops) for layer in count.layers] == [
        ("conv1", "Conv2d", 2 * conv),
        ("fc1", "Linear", 2 * fc),
    ]


class _Zoo(nn.Module):
    """Grouped strided conv, a transposed conv, and a Linear used twice on a 3-D tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2, bias=True)
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(10, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.up(self.conv(x)))  # 4x9x9 → 8x5x5 → 6x10x10
        return self.fc(self.fc(y.flatten(1, 2)))  # [1, 60, 10] twice


def test_flops_for_groups_transposed_and_reused_layers() -> None:
    conv = 8 * 5 * 5 * (4 // 2) * 3 * 3  # output elements x (C_in/groups) x k
    up = 8 * 5 * 5 * (6 // 1) * 2 * 2  # input elements x (C_out/groups) x k
    fc = 60 * 10 * 10  # rows x in x out, per call
    count = count_flops(_Zoo().eval(), (4, 9, 9))
    assert [layer.flops for layer in count.layers] == [2 * conv, 2 * up, 2 * fc, 2 * fc]
    assert count.per_image == 2 * (conv + up + 2 * fc)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"repeats": 0}, "repeats"),
        ({"batch_sizes": ()}, "at least one batch size"),
        ({"batch_sizes": (1, 0)}, "--batch-sizes 0: give a whole number from 1"),
        ({"batch_sizes": (4, 4)}, "distinct"),
        ({"threads": 0}, "threads"),
        ({"min_time_s": 0.0}, "--min-time 0: give a finite number of seconds > 0"),
    ],
)
def test_bad_configs_are_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(BnexportError, match=message):
        BenchConfig(**kwargs)


# --------------------------------------------------------------------------------------------
# One tiny run on the seed Net

TINY = BenchConfig(
    batch_sizes=(1, 4),
    repeats=3,
    warmup_s=0.005,
    min_time_s=0.002,
    cooldown_s=0.001,
    peak_n=128,
    peak_repeats=2,
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = randomize_net_state(Net(temperature=1.5), seed=3).eval()
    path = tmp_path_factory.mktemp("bench") / "net.pt"
    save_checkpoint(path, model, normalize=FASHION_MNIST_NORMALIZE, metadata={})
    return path


@pytest.fixture(scope="module")
def report(checkpoint: Path) -> BenchReport:
    events: list = []
    rep = run_bench(load_source(checkpoint), TINY, progress=events.append)
    stages = [e.stage for e in events]
    assert stages[0] == "setup" and stages[-1] == "measure"
    return rep


def test_run_measures_every_candidate_at_every_batch_size(report: BenchReport) -> None:
    names = [c.name for c in report.candidates]
    assert names == [BASELINE, "torch_eager_folded", REFERENCE_EXPORT, BNEXPORT_CPU, BNEXPORT_CUDA]
    ran = [c.name for c in report.candidates if c.available]
    assert ran[:4] == names[:4]
    cuda = report.candidates[-1]
    assert cuda.available or "CUDA" in cuda.reason or "onnxruntime-gpu" in cuda.reason
    assert {(m.candidate, m.batch_size) for m in report.measurements} == {
        (name, b) for name in ran for b in (1, 4)
    }
    # every candidate computes the same function as the unfolded model
    for c in report.candidates:
        if c.available:
            assert c.max_abs_diff is not None and c.max_abs_diff < 1e-4, c
            assert c.matches is True
    # torch's export keeps the temperature Mul (ORT fuses it); bnexport's has no BN, no Mul
    bn_ops = next(c for c in report.candidates if c.name == BNEXPORT_CPU).op_counts
    assert bn_ops is not None and "BatchNormalization" not in bn_ops and "Mul" not in bn_ops
    assert {"Conv", "Relu"} <= set(bn_ops)


def test_run_figures_agree_with_the_raw_times(report: BenchReport) -> None:
    per_image = report.flops.per_image
    assert per_image == 953_344
    for m in report.measurements:
        times = np.array(m.times_s)
        assert len(times) == TINY.repeats and (times > 0).all()
        assert m.median_s == pytest.approx(np.median(times))
        assert m.p90_s == pytest.approx(np.percentile(times, 90))
        assert m.images_per_s == pytest.approx(m.batch_size / np.median(times))
        assert m.gflops == pytest.approx(per_image * m.batch_size / np.median(times) / 1e9)
        assert m.peak_fraction == pytest.approx(m.gflops / report.peak.gflops)
        base = np.array(report.measurement(BASELINE, m.batch_size).times_s)
        assert m.speedup.median == pytest.approx(np.median(base / times))
    assert report.measurement(BASELINE, 1).speedup.median == 1.0
    for c in report.comparisons:
        ref = np.array(report.measurement(c.reference, c.batch_size).times_s)
        cand = np.array(report.measurement(c.candidate, c.batch_size).times_s)
        assert c.ratio.median == pytest.approx(np.median(ref / cand))
    assert {(c.candidate, c.batch_size) for c in report.comparisons} >= {
        (BNEXPORT_CPU, 1),
        (BNEXPORT_CPU, 4),
    }
    assert report.peak.gflops >= report.peak.median_gflops > 0


def test_report_to_dict_is_json_with_versions_threads_and_cpu(report: BenchReport) -> None:
    d = json.loads(json.dumps(report.to_dict()))
    env = d["environment"]
    assert env["cpu_model"] == cpu_model()
    assert env["versions"]["torch"] == torch.__version__
    assert {"onnxruntime", "onnx", "numpy", "bnexport"} <= set(env["versions"])
    assert env["threads"]["torch_intra_op"] >= 1
    assert d["config"]["batch_sizes"] == [1, 4]
    assert len(d["measurements"]) == len(report.measurements)
    assert d["flops"]["per_image"] == 953_344


def test_a_tuned_file_is_benched_with_every_setting_it_carries(tmp_path: Path) -> None:
    """Its ort_config keys and its session config entries (which onnxruntime never reads from a
    file: bnexport's factory applies them); a file carrying only ort_config is opted in."""
    from tiny_onnx import conv_net, save

    from bnexport.bench.candidates import tuned_candidates
    from bnexport.ort_config import OrtSettings, effective_settings
    from bnexport.tune import with_ort_config

    off = {"session.disable_prepacking": "1"}
    settings = OrtSettings(intra_op_num_threads=1, session_config_entries=off)  # type: ignore[arg-type]
    carried = save(with_ort_config(conv_net(), settings), tmp_path / "t.onnx")
    plain = save(
        with_ort_config(conv_net(), OrtSettings(intra_op_num_threads=1)), tmp_path / "p.onnx"
    )
    (info, runner), (plain_info, _) = tuned_candidates([carried, plain], ["x"])
    assert effective_settings(runner.session, off) == settings
    assert "prepacking=off" in info.label and "apply" in info.session_options["opened"]
    assert plain_info.session_options["opened"] == "ORT_LOAD_CONFIG_FROM_MODEL=1"
