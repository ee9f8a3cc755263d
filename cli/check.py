"""`bnexport check`: prove an ONNX model computes what its PyTorch model computes.

Thin glue: options → `CheckConfig` → `bnexport.parity.check_parity` → a table, optional JSON /
JUnit / Markdown files, and the exit code (0 pass, 1 mismatch, 2 bad input or CUDA unavailable).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from bnexport.cli.errors import EXIT_MISMATCH, EXIT_OK, handle_errors
from bnexport.cli.options import (
    DEFAULT_OPT_LEVELS,
    DEFAULT_PROVIDERS,
    DEFAULT_TOLERANCE,
    AtolOpt,
    BatchSizesOpt,
    InputShapeOpt,
    ModelOpt,
    NoiseFactorOpt,
    OptLevelsOpt,
    ProvidersOpt,
    RtolOpt,
    SamplesOpt,
    TemperatureOpt,
    ToleranceOpt,
    VerboseOpt,
    load_model_source,
    split_ints,
    split_values,
    tolerance_config,
)
from bnexport.cli.parity_report import render_report
from bnexport.cli.progress import parity_progress
from bnexport.limits import MAX_SEED
from bnexport.serving.defaults import DEFAULT_TIMEOUT_S

ModelArg = Annotated[
    Path | None,
    typer.Argument(help="The ONNX model to check (none with --url).", show_default=False),
]
UrlOpt = Annotated[
    str | None,
    typer.Option(
        "--url",
        help="Check the model a live KServe-v2 endpoint serves instead of a file "
        "(host:port or http://host:port; with --name).",
        show_default=False,
    ),
]
NameOpt = Annotated[
    str | None,
    typer.Option("--name", help="The model's name on the --url endpoint.", show_default=False),
]
GrpcOpt = Annotated[bool, typer.Option("--grpc", help="Talk v2 gRPC to --url, not HTTP.")]
TimeoutOpt = Annotated[
    float,
    typer.Option("--timeout", min=0.1, help="Seconds to wait for the --url endpoint."),
]
AgainstOpt = Annotated[
    Path | None,
    typer.Option(
        "--against",
        help="The checkpoint the ONNX model was exported from (bnexport or seed layout), or "
        "the weights (a state_dict) for --model.",
        show_default=False,
    ),
]
DataOpt = Annotated[
    Path | None,
    typer.Option("--data", help="Also feed the IDX test images in DIR.", show_default=False),
]
DataLimitOpt = Annotated[
    int | None,
    typer.Option(
        "--data-limit", min=1, help="Feed only the first N images of --data.", show_default=False
    ),
]
InputsOpt = Annotated[
    Path | None,
    typer.Option(
        "--inputs",
        help="Feed exactly these inputs (.npz from --save-inputs, or an array per ONNX input).",
        show_default=False,
    ),
]
SaveInputsOpt = Annotated[
    Path | None,
    typer.Option(
        "--save-inputs",
        help="Save what is fed (.npz) to rerun it with --inputs.",
        show_default=False,
    ),
]
BundledOpt = Annotated[
    bool | None,
    typer.Option(
        "--bundled/--no-bundled",
        help="Feed the 1000 bundled Fashion-MNIST images (default: for the seed Net).",
        show_default=False,
    ),
]
EdgeCasesOpt = Annotated[
    bool,
    typer.Option("--edge-cases/--no-edge-cases", help="Feed zeros, constant images and ±1e4."),
]
SeedOpt = Annotated[
    int, typer.Option("--seed", min=0, max=MAX_SEED, help="Seed of the random inputs.")
]
TimeBudgetOpt = Annotated[
    float | None,
    typer.Option(
        "--time-budget",
        min=0.001,
        help="Size the default samples and batch sizes for this many seconds of forwards at "
        "nominal speed (default 6; counted from the model's FLOPs, never timed).",
        show_default=False,
    ),
]
Tf32GateOpt = Annotated[
    bool, typer.Option("--tf32-gate", help="Let the CUDA-with-TF32 runner fail the check too.")
]
GroundTruthOpt = Annotated[
    bool,
    typer.Option(
        "--fp64/--no-fp64", help="Run the float64 PyTorch truth (needed by --tolerance noise)."
    ),
]
FoldedOpt = Annotated[
    bool, typer.Option("--folded/--no-folded", help="Also check the BN-folded PyTorch model.")
]
JsonOpt = Annotated[
    Path | None, typer.Option("--json", help="Write the whole report as JSON.", show_default=False)
]
JunitOpt = Annotated[
    Path | None,
    typer.Option(
        "--junit", help="Write JUnit XML (one test per runner and batch).", show_default=False
    ),
]
MarkdownOpt = Annotated[
    Path | None,
    typer.Option(
        "--markdown", help="Write a Markdown summary (for a CI job page).", show_default=False
    ),
]
LocalizeOpt = Annotated[
    bool | None,
    typer.Option(
        "--localize/--no-localize",
        help="Name the first layer whose error exceeds its budget (default: when the check "
        "fails; --localize also when it passes, with a JUnit case per layer).",
        show_default=False,
    ),
]
HtmlOpt = Annotated[
    Path | None,
    typer.Option(
        "--html",
        help="Write a self-contained HTML report (plots, layers, fold, machine).",
        show_default=False,
    ),
]


@handle_errors
def check_cli(
    ctx: typer.Context,
    model: ModelArg = None,
    against: AgainstOpt = None,
    model_spec: ModelOpt = None,
    input_shape: InputShapeOpt = None,
    temperature: TemperatureOpt = None,
    providers: ProvidersOpt = DEFAULT_PROVIDERS,
    opt_levels: OptLevelsOpt = DEFAULT_OPT_LEVELS,
    batch_sizes: BatchSizesOpt = None,
    data: DataOpt = None,
    data_limit: DataLimitOpt = None,
    inputs: InputsOpt = None,
    save_inputs: SaveInputsOpt = None,
    bundled: BundledOpt = None,
    samples: SamplesOpt = None,
    time_budget: TimeBudgetOpt = None,
    edge_cases: EdgeCasesOpt = True,
    seed: SeedOpt = 0,
    tolerance: ToleranceOpt = DEFAULT_TOLERANCE,
    noise_factor: NoiseFactorOpt = None,
    rtol: RtolOpt = None,
    atol: AtolOpt = None,
    tf32_gate: Tf32GateOpt = False,
    ground_truth: GroundTruthOpt = True,
    folded: FoldedOpt = True,
    json_path: JsonOpt = None,
    junit_path: JunitOpt = None,
    markdown_path: MarkdownOpt = None,
    localize: LocalizeOpt = None,
    html_path: HtmlOpt = None,
    verbose: VerboseOpt = False,
    url: UrlOpt = None,
    name: NameOpt = None,
    grpc: GrpcOpt = False,
    timeout: TimeoutOpt = DEFAULT_TIMEOUT_S,
) -> None:
    """Compare MODEL.onnx with its PyTorch model on onnxruntime (CPU, and CUDA when it runs).

    The PyTorch model is --against CHECKPOINT (the seed Net), --model (your factory), or both
    (your factory with weights). MODEL.onnx is check's only argument, so it cannot be mistaken
    for the checkpoint the other commands take first.

    A .data file of external weights is read beside MODEL.onnx, never outside its folder. The
    report files (--json, --junit, --markdown) are written all or nothing; none may be an input.
    """
    from bnexport.ort import show_log

    show_log(verbose)
    reports = {
        "--json": json_path,
        "--junit": junit_path,
        "--markdown": markdown_path,
        "--html": html_path,
    }
    model = _check_target(model, url, name)
    _check_paths(model, [against, inputs], {**reports, "--save-inputs": save_inputs})
    from bnexport.parity import CheckConfig, InputConfig

    _check_sources(ctx.args, model or Path(str(url)), against, model_spec, inputs, data)
    if model is not None:
        from bnexport.onnx_file import check_onnx_model

        check_onnx_model(model)  # the front door: before any work
    config = CheckConfig(
        providers=split_values(providers, "--providers"),
        opt_levels=split_values(opt_levels, "--opt-levels"),
        batch_sizes=split_ints(batch_sizes, "--batch-sizes"),
        inputs=InputConfig(
            bundled=bundled,
            data_dir=data,
            data_limit=data_limit,
            inputs_file=inputs,
            seed=seed,
            edge_cases=edge_cases,
        ),
        samples=samples,
        **({} if time_budget is None else {"time_budget_s": time_budget}),
        save_inputs=save_inputs,
        **tolerance_config(tolerance, noise_factor, rtol, atol),
        tf32_gate=tf32_gate,
        ground_truth=ground_truth,
        folded=folded,
        folded_gating=False,  # check's own fold: the file need not be its export
        localize={None: "on-failure", True: "always", False: "never"}[localize],
    )
    source = load_model_source(against, model_spec, input_shape, temperature)
    check_check_memory(source, config)
    if url is not None:
        report = _check_url(url, str(name), grpc, timeout, source, config)
    else:
        assert model is not None
        report = _check_file(model, source, config, folded)
    report.write_reports(
        json_path=json_path,
        junit_path=junit_path,
        markdown_path=markdown_path,
        html_path=html_path,
    )
    render_report(report, verbose=verbose)
    raise typer.Exit(EXIT_OK if report.passed else EXIT_MISMATCH)


def _check_file(model: Path, source: Any, config: Any, folded: bool) -> Any:
    """`check_parity` of the file against the source's model; a file no runner can run is bad
    input (exit 2), not a mismatch."""
    from bnexport.parity import check_parity

    # The fold also maps a folded file's chains to the modules they end in (--localize).
    fold = _fold_for_check(source) if folded or config.localize != "never" else None
    folded_module, folded_reason, fold_report = fold or (None, "", None)
    with parity_progress() as progress:
        report = check_parity(
            model,
            source.model,
            config,
            normalize=source.normalize,
            input_shape=[s.shape for s in source.input_specs],
            folded=folded_module,
            folded_reason=folded_reason,
            reference_name=source.name,
            progress=progress,
            rebuild=source.rebuild,
            fold_report=fold_report,
        )
    refuse_unrunnable(model, report)
    return report


def check_check_memory(source: Any, config: Any) -> None:
    """Refuse --samples whose inputs alone would not fit in the memory here: a sample is kept as
    fed and in float64 for the truth (`bnexport.limits.check_memory`). A batch size larger than
    the samples runs them all in one batch: no bound of its own."""
    from bnexport.limits import check_memory

    if config.samples:
        needed = config.samples * 3 * source.sample_bytes
        check_memory(needed, f"--samples {config.samples}", "give fewer")


def refuse_unrunnable(model: Path, report: Any) -> None:
    """A file no onnxruntime runner could run is bad input (exit 2), not a parity result."""
    from bnexport.errors import ParityInputError

    onnx = [r for r in report.results if r.kind != "torch"]
    if onnx and all(r.error for r in onnx):
        raise ParityInputError(
            f"{model} cannot run on onnxruntime ({onnx[0].runner}: {onnx[0].error}); the file "
            "is broken or is not this model's export: re-export it"
        )


def _check_target(model: Path | None, url: str | None, name: str | None) -> Path | None:
    """An ONNX file, or --url with --name; never both, never neither."""
    from bnexport.errors import ParityInputError

    if url is None:
        if name is not None:
            raise ParityInputError("--name names a model on a --url endpoint; give --url too")
        if model is None:
            raise ParityInputError("give the ONNX model to check, or --url URL --name NAME")
        return model
    if model is not None:
        raise ParityInputError(
            f"give the ONNX model {model} or --url {url}, not both (--url checks what the "
            "endpoint serves)"
        )
    if not name:
        raise ParityInputError(f"--url {url} needs --name, the model's name on the endpoint")
    return None


def _check_url(url: str, name: str, grpc: bool, timeout: float, source: Any, config: Any) -> Any:
    """The parity gate against the endpoint (`bnexport.serving.endpoint_check`)."""
    from dataclasses import replace

    from bnexport.serving.endpoint_check import Endpoint, check_endpoint

    with parity_progress() as progress:
        return check_endpoint(
            Endpoint(url, name, grpc, timeout),
            source.model,
            replace(config, folded=False),
            normalize=source.normalize,
            input_shape=[s.shape for s in source.input_specs],
            reference_name=source.name,
            progress=progress,
        )


def _fold_for_check(source: Any) -> tuple[Any, str, Any]:
    """The BN-folded model `check` runs as a candidate and its fold report, or None and why:
    folding is not what `check` checks, so a model that cannot be folded only skips that
    runner."""
    from bnexport.errors import raise_if_interrupted
    from bnexport.fold import fold_model

    try:
        # No self-check: the folded runner is itself checked against the float64 truth.
        result = fold_model(source.model, source.example_inputs, verify=False)
        return result.module, "", result.report
    except Exception as exc:
        raise_if_interrupted(exc)
        return None, f"the model cannot be folded: {type(exc).__name__}: {exc}", None


def _check_paths(
    model: Path | None, inputs: list[Path | None], outputs: dict[str, Path | None]
) -> None:
    """Every output path is writable and none is an input (the model's .data files included)."""
    from bnexport.files import check_output_paths
    from bnexport.onnx_file import external_data_files

    sidecars = external_data_files(model) if model is not None and model.is_file() else ()
    check_output_paths(outputs, [model, *sidecars, *inputs])


def _check_sources(
    extra: list[str],
    model: Path,
    against: Path | None,
    model_spec: str | None,
    inputs: Path | None,
    data: Path | None,
) -> None:
    """One ONNX positional, something to compare with, and --inputs without --data."""
    from bnexport.errors import ParityInputError

    if extra:  # a second positional (the other commands take the checkpoint first)
        raise ParityInputError(_positional_checkpoint_fix(model, extra))
    if against is None and model_spec is None:
        raise ParityInputError(
            "nothing to compare with: give --against CHECKPOINT or --model package.module:factory"
        )
    if inputs is not None and data is not None:
        raise ParityInputError("--inputs replaces every generated input; drop --data")


def _positional_checkpoint_fix(model: Path, extra: list[str]) -> str:
    """The message for ``check A B``: which of the two is the ONNX file is guessed from the
    suffixes, only to spell the fix."""
    if len(extra) > 1:
        return f"check takes one positional, the ONNX file; got also {' '.join(extra)}"
    second = Path(extra[0])
    onnx, weights = (second, model) if second.suffix == ".onnx" != model.suffix else (model, second)
    return (
        f"check takes one positional, the ONNX file, and the checkpoint as --against: "
        f"bnexport check {onnx} --against {weights}"
    )
