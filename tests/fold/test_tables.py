"""The fold report's screen rows and lines (`bnexport.fold.tables`): alike chains grouped by their
shape, chains without a BatchNorm summarized, the localization in at most 10 lines."""

from __future__ import annotations

from bnexport.fold.report import ChainEntry, FoldEntry, FoldReport
from bnexport.fold.tables import (
    LOCALIZATION_LINES,
    chain_lines,
    chain_pattern,
    localization_lines,
    report_rows,
)


def test_chain_pattern_drops_operand_paths_and_shapes_only() -> None:
    chain = "BatchNorm2d → ×view(param stages.0.blocks.0.ls2.gamma[48]) → +buffer shift[4]"
    assert chain_pattern(chain) == "BatchNorm2d → ×view(param …ls2.gamma) → +buffer shift"
    plain = "BatchNorm2d → ×1.5 (temperature) → −0.25"
    assert chain_pattern(plain) == plain  # nothing to drop: the numbers stay


def _layer_scale(k: int, width: int) -> FoldEntry:
    return FoldEntry(
        bn=f"stages.{k}.blocks.0.mlp.norm2",
        bn_type="BatchNorm2d",
        status="folded",
        chain=f"BatchNorm2d → ×view(param stages.{k}.blocks.0.ls2.gamma[{width}])",
        into=f"stages.{k}.blocks.0.mlp.fc2",
        layer_type="Conv2d",
        direction="after",
        max_rel_weight_change=0.5,
        notes=[f"learnable parameter stages.{k}.blocks.0.ls2.gamma folded as a constant"],
    )


def test_chains_that_differ_only_in_their_parameter_paths_are_one_group() -> None:
    """efficientformer's layer scales: 14 BNs, one row (not one each, as the paths differ)."""
    entries = [_layer_scale(k, 48 * (1 + k % 4)) for k in range(14)]
    rows, lines = report_rows(FoldReport(entries=entries))
    assert len(rows) == 1
    assert rows[0][0].startswith("14 × BatchNorm2d\nstages.0.blocks.0.mlp.norm2 …")
    assert rows[0][2] == "BatchNorm2d → ×view(param …ls2.gamma)"
    assert lines == [
        "14 learnable parameters folded as constants (their values now), e.g. "
        "stages.0.blocks.0.ls2.gamma"
    ]


def test_an_entry_with_a_note_of_its_own_keeps_its_row() -> None:
    entries = [_layer_scale(k, 48) for k in range(13)]
    entries[5].notes.append("stages.5.blocks.0.mlp.fc2 is shared: only this call uses a copy")
    rows, lines = report_rows(FoldReport(entries=entries))
    assert len(rows) == 2 and rows[0][0] == "stages.5.blocks.0.mlp.norm2\n(BatchNorm2d)"
    assert any("is shared" in line for line in lines)


def test_chains_without_a_batchnorm_are_grouped_with_one_reason() -> None:
    left = [
        ChainEntry(f"stages.{k}.conv3", "ScaledStdConv2d", "×0.2", "left", f"stages.{k}.conv3 …")
        for k in range(8)
    ]
    folded = ChainEntry("head.fc", "Linear", "÷1.5", "folded")
    lines = chain_lines([*left, folded])
    assert lines == [
        "Scale/shift chain ×0.2 after 8 layers, stages.0.conv3 … stages.7.conv3 "
        "(ScaledStdConv2d): left: stages.0.conv3 …",
        "Scale/shift chain ÷1.5 after head.fc (Linear): folded",
    ]


def _step(k: int, passed: bool) -> dict[str, object]:
    return {
        "bn": f"b{k}",
        "into": f"c{k}",
        "error": 1e-16 if passed else 1e-9,
        "floor": 1e-15,
        "limit": 4e-15,
        "passed": passed,
    }


def test_localization_names_the_first_failing_step_in_at_most_10_lines() -> None:
    steps = [_step(k, k < 40) for k in range(60)]
    lines = localization_lines({"steps": steps, "first_failing": "b40"})
    assert len(lines) <= LOCALIZATION_LINES
    assert lines[0].startswith(
        "localization: the first fold step whose float64 output diverges is b40 folded into c40 "
        "(step 41 of 60)"
    )
    assert [line.split()[1] for line in lines[1:]] == ["ok", "ok", "FAIL", "FAIL", "FAIL"]


def test_localization_without_a_failing_step_says_so() -> None:
    (line,) = localization_lines({"steps": [_step(0, True)], "first_failing": None})
    assert "1 fold step compared" in line and "none diverges" in line
