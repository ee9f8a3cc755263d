"""The fold's float64 self-check: exact folds pass (even ill-conditioned ones), wrong math fails.

Mutants of `bnexport.fold.math` (no eps, wrong axis, dropped bias) are monkeypatched in; the fold
then runs them on both the returned module and the float64 copy the self-check compares.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnexport.fold.math as fm
from bnexport.errors import FoldError
from bnexport.fold import fold_model


class ConvBN(nn.Module):
    def __init__(
        self, mean: float = 0.0, var: float = 1.0, bias: bool = True, padding: int = 1
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=padding, bias=bias)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 4, 1)
        with torch.no_grad():
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.normal_(0, 0.1)
            self.bn.running_mean.normal_(mean, 0.1)
            self.bn.running_var.uniform_(0.5 * var, 1.5 * var)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))))


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def test_a_correct_fold_passes_with_its_numbers() -> None:
    v = fold_model(ConvBN(), X).report.verification
    assert v is not None and v["passed"] and v["rule"] == "noise"
    assert v["relative_error"] <= v["limit"] < 1e-12  # float64 agreement, not fp32's 1e-4


def test_an_ill_conditioned_correct_fold_passes() -> None:
    """Inputs offset by 1e3 around which BN normalises (μ = the conv's mean output, σ² its small
    spread): y − μ cancels three digits, in fp32 and float64 alike, and the fold's bias cancels
    the same huge terms. The measured noise floor grows with it, so the correct fold passes."""
    model = ConvBN(padding=0)  # every output sees the full offset
    x = X + 1e3
    with torch.no_grad():
        y = model.conv(x)
        model.bn.running_mean.copy_(y.mean((0, 2, 3)))
        model.bn.running_var.copy_(y.var((0, 2, 3)))
    v = fold_model(model, x).report.verification
    assert v is not None and v["passed"]
    eps64 = torch.finfo(torch.float64).eps
    assert v["noise_floor"] > 100 * eps64  # far above float64's epsilon: the model amplifies
    assert v["relative_error"] > 10 * eps64  # and the fold's error is larger than a bare eps


def _no_eps(mean, var, eps, weight=None, bias=None):  # type: ignore[no-untyped-def]
    return ORIGINAL_AFFINE(mean, var, 0.0, weight, bias)


ORIGINAL_AFFINE = fm.bn_affine
ORIGINAL_SCALE = fm.scale_output_channels
ORIGINAL_AFTER = fm.fold_after


def _wrong_axis(kind, weight, scale, groups=1):  # type: ignore[no-untyped-def]
    w = weight.detach().double()
    s = scale.detach().double().reshape(-1)
    if kind == "conv" and w.shape[1] == s.numel():
        return w * s.reshape(1, -1, *([1] * (w.dim() - 2)))
    return w * s.flip(0).reshape(-1, *([1] * (w.dim() - 1)))  # channels mixed up


def _dropped_bias(kind, weight, bias, scale, shift, groups=1):  # type: ignore[no-untyped-def]
    return ORIGINAL_AFTER(kind, weight, None, scale, shift, groups)


@pytest.mark.parametrize(
    ("name", "replacement"),
    [("bn_affine", _no_eps), ("scale_output_channels", _wrong_axis), ("fold_after", _dropped_bias)],
)
def test_a_wrong_fold_is_localized_and_left_unfolded(
    name: str, replacement: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The self-check fails, the step that broke is named, its BN stays, the rest checks exact."""
    monkeypatch.setattr(fm, name, replacement)
    model = ConvBN(var=1e-3)
    result = fold_model(model, X)
    report = result.report
    (entry,) = report.entries
    assert (entry.bn, entry.status, entry.reason_code) == ("bn", "left", "self_check")
    assert "into conv failed the float64 self-check" in entry.reason
    assert "limit 4×" in entry.reason and "bnexport bug" in entry.reason
    assert report.verification is not None and report.verification["passed"]
    assert report.verification["excluded"] == ["bn"]
    assert report.localization is not None and report.localization["first_failing"] == "bn"
    assert any("localized to the fold of bn" in n for n in report.notes)
    torch.testing.assert_close(result.module(X), model(X))


class ThreeBlocks(nn.Module):
    """conv → BN → ReLU, three times (b1, b2, b3)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        for k in (1, 2, 3):
            setattr(self, f"c{k}", nn.Conv2d(3, 3, 3, padding=1))
            bn = nn.BatchNorm2d(3)
            with torch.no_grad():
                bn.running_mean.normal_(0, 0.1)
                bn.running_var.uniform_(0.5, 1.5)
            setattr(self, f"b{k}", bn)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for k in (1, 2, 3):
            x = torch.relu(getattr(self, f"b{k}")(getattr(self, f"c{k}")(x)))
        return x


def test_the_first_step_that_diverges_is_named_not_the_ones_after_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bug in the fold of b2 only: b3's output diverges too (it inherits b2's error), but the
    first diverging step in execution order is b2, and only b2 is left."""
    model = ThreeBlocks()
    target = model.c2.weight

    def broken_after(kind, weight, bias, scale, shift, groups=1):  # type: ignore[no-untyped-def]
        folded = ORIGINAL_AFTER(kind, weight, bias, scale, shift, groups)
        if weight.shape == target.shape and torch.equal(weight, target.double()):
            return fm.Folded(folded.weight * 1.001, folded.bias)
        return folded

    monkeypatch.setattr(fm, "fold_after", broken_after)
    report = fold_model(model, X, localize=True).report
    assert [(e.bn, e.status) for e in report.entries] == [
        ("b1", "folded"),
        ("b2", "left"),
        ("b3", "folded"),
    ]
    loc = report.localization
    assert loc is not None and loc["first_failing"] == "b2"
    assert [s["passed"] for s in loc["steps"]] == [True, False, False]


def test_localize_on_a_correct_fold_finds_no_diverging_step() -> None:
    report = fold_model(ThreeBlocks(), X, localize=True).report
    loc = report.localization
    assert loc is not None and loc["first_failing"] is None
    assert [s["bn"] for s in loc["steps"]] == ["b1", "b2", "b3"]
    assert all(s["error"] <= s["limit"] for s in loc["steps"])
    assert report.entries[0].status == "folded"


def test_a_fold_broken_everywhere_fails_after_a_bounded_number_of_tries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from bnexport.fold import pipeline

    monkeypatch.setattr(pipeline, "MAX_EXCLUDED", 2)
    monkeypatch.setattr(fm, "bn_affine", _no_eps)
    model = ThreeBlocks()
    for k in (1, 2, 3):
        getattr(model, f"b{k}").running_var.fill_(1e-3)
    with pytest.raises(FoldError) as info:
        fold_model(model, X)
    msg = str(info.value)
    assert "fold self-check failed" in msg and "the limit is 4×" in msg
    assert "bnexport bug" in msg and "--no-verify" in msg


def test_no_verify_skips_the_check_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fm, "bn_affine", _no_eps)
    report = fold_model(ConvBN(var=1e-3), X, verify=False).report
    assert report.verification is None
    assert any("self-check was skipped" in n for n in report.notes)


class Noisy(ConvBN):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + 1e-3 * torch.rand_like(x[:, :1, :, :].expand(-1, 4, -1, -1))


def test_a_random_model_is_not_called_a_bnexport_bug() -> None:
    with pytest.raises(FoldError) as info:
        fold_model(Noisy(), X)
    msg = str(info.value)
    assert "not deterministic" in msg and "bnexport bug" not in msg and "--no-verify" in msg


@pytest.mark.parametrize("bias", [True, False])
def test_large_linear_weights_are_converted_blockwise_to_the_same_float64_result(
    monkeypatch: pytest.MonkeyPatch, bias: bool
) -> None:
    """A Linear weight above `LARGE_WEIGHT` stays fp32 in the state and is converted a block of
    rows at a time; the output is torch's own float64 forward, to float64 rounding."""
    import copy

    import bnexport.fold.verify as verify

    monkeypatch.setattr(verify, "LARGE_WEIGHT", 64)
    monkeypatch.setattr(verify, "_BLOCK", 40)  # 2 rows of 20 per block, an uneven last block
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(20, 33, bias=bias), nn.ReLU(), nn.Linear(33, 5)).eval()
    x = torch.randn(4, 20)
    expected = copy.deepcopy(model).double()(x.double())
    (got,) = verify.run_float64(model, (x.double(),))
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-14, atol=1e-14)
    assert model[0].weight.dtype == torch.float32  # the model is untouched
