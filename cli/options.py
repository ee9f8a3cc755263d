"""Options the commands share (same names, same meaning) and the parsers that turn their text into
library arguments: the model selection, parity and timing options, validated choices with shell
completion, and comma-separated lists.

Parsers raise `BnexportError` (exit 2 through `handle_errors`); a choice outside its list is a
Typer usage error (exit 2) naming the choices.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from bnexport import defaults
from bnexport.cli.errors import State

# Model selection, shared by fold, onnx, check and bench (same names, same meaning).
ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="Your own model as package.module:factory (the factory returns an nn.Module).",
        show_default=False,
    ),
]
InputShapeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--input-shape",
        metavar="<shape[:dtype]>",
        help="Input shape without the batch dimension, e.g. 3,32,32, with an optional dtype "
        "(8:int64; default float32). Needed with --model; repeat it once per forward input, in "
        "order.",
        show_default=False,
    ),
]
TemperatureOpt = Annotated[
    float | None,
    typer.Option(
        "--temperature",
        help="Temperature of a seed state dict (default 1.0; bnexport checkpoints record theirs).",
        show_default=False,
    ),
]


def load_model_source(
    checkpoint: Path | None,
    model: str | None,
    input_shapes: list[str] | None,
    temperature: float | None,
) -> Any:
    """Parse the shared model options and load the model (`bnexport.source.load_source`)."""
    from bnexport.limits import check_temperature
    from bnexport.source import load_source, parse_input_spec

    if temperature is not None:
        check_temperature(temperature)
    specs = [parse_input_spec(text) for text in input_shapes or ()]
    source = load_source(
        checkpoint, model_spec=model, input_specs=specs or None, temperature=temperature
    )
    if State.console_script:
        # The imported libraries and the model live until the command ends: frozen, they are
        # not walked again by each of the many full collections torch's exporter triggers
        # (≈ 1 s on resnet50). Only in the program: in-process callers keep normal collection.
        gc.freeze()
    return source


def split_names(text: str | None, flag: str) -> tuple[str, ...] | None:
    """``"a,b"`` → ``("a", "b")``; None stays None; empty or repeated names are an error."""
    from bnexport.errors import BnexportError

    if text is None:
        return None
    names = tuple(n.strip() for n in text.split(","))
    if not all(names) or len(set(names)) != len(names):
        raise BnexportError(f"{flag} {text!r} must be distinct, non-empty, comma-separated names")
    return names


def choices(values: Sequence[str], flag: str, *, multiple: bool = False) -> dict[str, Any]:
    """``typer.Option`` keyword arguments making a ``str`` option one of `values` (or, with
    `multiple`, a comma-separated list of them): a usage error (exit 2) naming the choices, and
    shell completion of each item."""
    shown = ", ".join(values)

    def validate(value: str | None) -> str | None:
        if value is None:
            return None
        items = [item.strip().lower() for item in value.split(",")]
        bad = [item for item in items if item not in values]
        if bad or (not multiple and len(items) != 1):
            what = "one or more, comma-separated, of" if multiple else "one of"
            raise typer.BadParameter(f"{value!r}: choose {what} {shown}", param_hint=flag)
        return ",".join(items)

    def complete(incomplete: str) -> list[str]:
        head, sep, last = incomplete.rpartition(",") if multiple else ("", "", incomplete)
        taken = set(head.split(",")) if sep else set()
        return [head + sep + v for v in values if v.startswith(last.lower()) and v not in taken]

    return {"callback": validate, "autocompletion": complete}


# Parity options, shared by check and onnx (same names, same meaning; CheckConfig's fields).
DEFAULT_PROVIDERS = ",".join(defaults.DEFAULT_PROVIDERS)
DEFAULT_OPT_LEVELS = ",".join(defaults.DEFAULT_OPT_LEVELS)
DEFAULT_TOLERANCE = defaults.DEFAULT_TOLERANCE_MODE
#: What `onnx`, `fold` and `tune` do with a file whose parity check failed (docs/reference.md).
KeepFailedOpt = Annotated[
    bool,
    typer.Option(
        "--keep-failed",
        help="When the parity check fails (exit 1), keep the file as NAME.failed.SUFFIX beside "
        "-o for inspection (default: nothing is left at -o or beside it).",
    ),
]
#: bench's and tune's timing (`bnexport.timing`); defaults in `bnexport.defaults`.
MinTimeOpt = Annotated[
    float,
    typer.Option("--min-time", help="Seconds one timing lasts at least (many calls if fast)."),
]
WarmupOpt = Annotated[
    float, typer.Option("--warmup", help="Warm-up seconds per candidate (each batch size, stage).")
]
CooldownOpt = Annotated[
    float,
    typer.Option("--cooldown", help="Idle seconds before each timing (spinning threads park)."),
]
ProvidersOpt = Annotated[
    str,
    typer.Option(
        "--providers",
        help="onnxruntime providers: auto (CPU, plus CUDA when a probe proves it runs), cpu, cuda "
        "or cpu,cuda. CUDA asked for and not running is exit 2, never a CPU pass.",
        **choices(defaults.PROVIDER_CHOICES, "--providers", multiple=True),
    ),
]
ToleranceOpt = Annotated[
    str,
    typer.Option(
        "--tolerance",
        help="noise: a runner passes when its error against the float64 truth is within "
        "--noise-factor × PyTorch fp32's own error (docs/parity.md); fixed: --rtol/--atol against "
        "PyTorch fp32.",
    ),
]
NoiseFactorOpt = Annotated[
    float | None,
    typer.Option(
        "--noise-factor",
        help="How many times fp32's own error a runner may err (--tolerance noise; default "
        "measured in docs/parity.md).",
        show_default=False,
    ),
]
RtolOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--rtol",
        help="With --tolerance fixed: relative tolerance, for every runner kind or KIND=VALUE "
        "(kinds: cpu, torch, cuda, cuda-tf32). Repeatable.",
        show_default=False,
    ),
]
AtolOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--atol",
        help="With --tolerance fixed: absolute tolerance per unit of output scale: "
        "atol = VALUE·max(1, max|ref|). VALUE or KIND=VALUE, repeatable.",
        show_default=False,
    ),
]
SamplesOpt = Annotated[
    int | None,
    typer.Option(
        "--samples",
        "--random",
        min=0,
        help="Seeded random samples to feed, with every edge case. Default: 64, fewer for an "
        "expensive model (sized on its counted FLOPs, never on the clock, so the same check "
        "feeds the same samples anywhere; the most expensive get 2 with only the zeros and "
        "±large edge cases, and a note says what was fed and why).",
        show_default=False,
    ),
]
BatchSizesOpt = Annotated[
    str | None,
    typer.Option(
        "--batch-sizes",
        help="onnxruntime batch sizes, comma-separated. Default: 1,7,64, or 1,7 for an "
        "expensive model; a fixed-batch file: its batch.",
        show_default=False,
    ),
]
OptLevelsOpt = Annotated[
    str,
    typer.Option(
        "--opt-levels",
        help="onnxruntime CPU graph optimization levels, comma-separated: "
        f"{', '.join(defaults.OPT_LEVELS)}.",
        **choices(defaults.OPT_LEVELS, "--opt-levels", multiple=True),
    ),
]
VerboseOpt = Annotated[
    bool,
    typer.Option(
        "--verbose", "-v", help="One parity row per runner, batch size and output (worst element)."
    ),
]


def split_values(text: str, flag: str) -> tuple[str, ...]:
    """``"a, B"`` → ``("a", "b")``; at least one value."""
    from bnexport.errors import ParityInputError

    items = tuple(p.strip().lower() for p in text.split(",") if p.strip())
    if not items:
        raise ParityInputError(f"{flag} needs at least one value")
    return items


def split_ints(text: str | None, flag: str) -> tuple[int, ...] | None:
    """``"1,7"`` → ``(1, 7)``; None stays None."""
    from bnexport.errors import ParityInputError

    if text is None:
        return None
    try:
        return tuple(int(p) for p in split_values(text, flag))
    except ValueError:
        raise ParityInputError(f"{flag} {text!r} must be comma-separated integers") from None


def tolerance_config(
    tolerance: str, noise_factor: float | None, rtol: list[str] | None, atol: list[str] | None
) -> dict[str, Any]:
    """``CheckConfig`` keyword arguments for the tolerance options."""
    from bnexport.noise import NoiseTolerance
    from bnexport.parity.tolerance import parse_tolerance_overrides

    mode = tolerance.strip().lower()
    out: dict[str, Any] = {
        "tolerance_mode": mode,
        "tolerances": parse_tolerance_overrides(rtol or (), atol or ()),
    }
    if noise_factor is not None:
        if mode != "noise":
            from bnexport.errors import ParityInputError

            raise ParityInputError(
                "--noise-factor sets the noise-relative rule: drop --tolerance fixed"
            )
        out["noise_tolerance"] = NoiseTolerance(factor=noise_factor)
    return out
