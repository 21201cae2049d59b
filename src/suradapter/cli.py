"""`sur`: one thin command per stage, plus the main job. Logic lives in the stage modules."""

from __future__ import annotations

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # hide optional-backend notices

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import typer
import yaml
from rich.console import Console
from rich.table import Table

from suradapter.config import Params, ParamsError, load_params
from suradapter.stack import apply_client_env
from suradapter.stack.cli import stack_app

if TYPE_CHECKING:
    from suradapter.model.adapter import SURAdapter

app = typer.Typer(
    help="SUR-adapter: make text-to-image models understand short narrative prompts.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
params_app = typer.Typer(help="Inspect the typed params.", no_args_is_help=True)
adapter_app = typer.Typer(help="Inspect and convert adapters.", no_args_is_help=True)
app.add_typer(params_app, name="params")
shapes_app = typer.Typer(help="The procedurally rendered shapes world.", no_args_is_help=True)
app.add_typer(adapter_app, name="adapter")
app.add_typer(shapes_app, name="shapes")
app.add_typer(stack_app, name="stack")
console = Console()


@dataclass
class CliState:
    params_path: Path | None = None
    profile: str | None = None

    def load(self, profile: str | None = None) -> Params:
        try:
            return load_params(self.params_path, profile or self.profile)
        except ParamsError as err:
            fail(str(err))


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print `message` as an error and exit with `code`."""
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


@app.callback()
def main(
    ctx: typer.Context,
    params: Path | None = typer.Option(
        None, "--params", envvar="SUR_PARAMS", help="Params file (default ./params.yaml)."
    ),
    profile: str | None = typer.Option(
        None, "--profile", envvar="SUR_PROFILE", help="Profile overlay: tiny, shapes or sd15."
    ),
) -> None:
    ctx.obj = CliState(params, profile)
    try:
        state_dir = load_params(params, profile).stack.state_dir
    except ParamsError:
        state_dir = None  # the command itself reports the params error
    apply_client_env(state_dir)  # a running `sur stack` is where tracking goes


SHAPES_WORLD_SECTIONS = ("shapes", "bootstrap")  # the stages that make the shapes world


@params_app.command("show")
def params_show(
    ctx: typer.Context,
    show_all: bool = typer.Option(
        False, "--all", help="Also the shapes-world sections a real profile does not use."
    ),
) -> None:
    """Print the merged, validated params of the active profile as YAML."""
    params = ctx.obj.load()
    shown = params.model_dump(mode="json")
    hidden = [] if show_all or params.uses_shapes_world else list(SHAPES_WORLD_SECTIONS)
    for section in hidden:
        del shown[section]
    console.print(yaml.safe_dump(shown, sort_keys=False), end="", highlight=False, soft_wrap=True)
    if hidden:
        console.print(
            f"# not shown: {', '.join(hidden)} (they configure the shapes-world stages, which "
            f"profile '{params.profile}' does not run; --all shows them)",
            highlight=False,
            soft_wrap=True,
        )


@adapter_app.command("info")
def adapter_info(
    ctx: typer.Context,
    target: str = typer.Argument(..., help="A saved adapter folder, or a profile name."),
) -> None:
    """Print an adapter's mode, eta, shape and parameter counts."""
    from suradapter.model.adapter import SURAdapter, describe_adapter

    if Path(target).is_dir():
        try:
            adapter = SURAdapter.from_pretrained(target)
        except (OSError, ValueError) as err:
            fail(f"{target}: not a saved SUR-adapter folder ({err})")
        source = target
    else:
        adapter = _adapter_for_profile(ctx.obj.load(profile=target))
        source = f"profile '{target}' (fresh init)"
    table = Table(title=f"SUR-adapter: {source}", show_header=False)
    for key, value in describe_adapter(adapter).items():
        table.add_row(key, str(value))
    console.print(table)


def _adapter_for_profile(params: Params) -> SURAdapter:
    from suradapter.model.adapter import SURAdapter

    mixer = params.adapter.token_mixer
    try:
        if params.adapter.width is None or (mixer is not None and mixer.tokens is None):
            from suradapter.model.zoo import BaseModelNotFoundError, load_base_from_params

            try:
                pipeline = load_base_from_params(params.base_model)
            except BaseModelNotFoundError as err:
                fail(str(err))
            return SURAdapter.for_pipeline(params.adapter, pipeline)
        return SURAdapter.from_params(params.adapter)
    except ValueError as err:
        fail(str(err))


@adapter_app.command("convert-reference")
def adapter_convert_reference(
    checkpoint: Path = typer.Argument(..., exists=True, dir_okay=False, help="Official adapter.pt"),
    out_dir: Path = typer.Argument(..., help="Folder to write (save_pretrained layout)."),
    adapter_weight: float = typer.Option(
        0.1, "--adapter-weight", help="eta used in training (not stored in the .pt)."
    ),
) -> None:
    """Convert an official SUR-adapter `.pt` into a `save_pretrained` folder (reference mode)."""
    from suradapter.model.adapter import SURAdapter

    try:
        adapter = SURAdapter.from_reference_checkpoint(checkpoint, adapter_weight=adapter_weight)
    except ValueError as err:
        fail(str(err))
    adapter.save_pretrained(out_dir)
    console.print(f"wrote {out_dir} (mode=reference, eta={adapter_weight})")


@shapes_app.command("generate")
def shapes_generate(
    ctx: typer.Context,
    num: int | None = typer.Option(None, "--num", help="Samples (default: shapes.num_samples)."),
    out: Path | None = typer.Option(None, "--out", help="Folder (default: shapes.output_dir)."),
) -> None:
    """Render the shapes world as a SURD folder (metadata.jsonl beside images)."""
    from suradapter.data.shapes import generate_shapes_dataset

    params = ctx.obj.load().shapes
    folder = generate_shapes_dataset(params, Path(out or params.output_dir), num)
    console.print(f"wrote {num or params.num_samples} samples to {folder}")


@app.command("prepare")
def prepare(
    ctx: typer.Context,
    source: Path | None = typer.Option(None, "--source", help="SURD folder (default: params)."),
    out: Path | None = typer.Option(None, "--out", help="Output folder (default: params)."),
    limit: int | None = typer.Option(
        None, "--limit", min=1, help="Only the first N rows (a smoke run)."
    ),
) -> None:
    """Validate a SURD folder into a Parquet manifest, normalised images and a quarantine."""
    from suradapter.checks import ConfigMistake, check_base_resolution, surd_source
    from suradapter.data.prepare import PrepareError, prepare_dataset
    from suradapter.data.surd import SurdError

    params = ctx.obj.load()
    try:
        source = surd_source(params, source)
        check_base_resolution(params)
    except ConfigMistake as err:
        fail(str(err))
    try:
        summary = prepare_dataset(params.prepare, source, out, limit)
    except (PrepareError, SurdError) as err:
        fail(str(err), code=1)
    _print_prepare_summary(summary.as_dict())


def _print_prepare_summary(summary: dict) -> None:
    table = Table(title="prepare", show_header=False)
    for key in ("rows_read", "kept", "reused", "bad_fraction"):
        table.add_row(key, str(summary[key]))
    for reason, count in summary["quarantined"].items():
        table.add_row(f"quarantined: {reason}", str(count))
    for split, count in summary["splits"].items():
        table.add_row(f"split: {split}", str(count))
    console.print(table)


SHARD_OPTION = typer.Option(
    None, "--shard", help="Do share i of n ('i/n'); default from RANK/WORLD_SIZE or all."
)


def parsed_shard(shard: str | None):
    """The `--shard i/n` of `sur embed` and `sur encode` (None: from RANK/WORLD_SIZE or all)."""
    from suradapter.teacher.embed import ShardSpec

    return ShardSpec.parse(shard) if shard else None


def print_summary(title: str, summary: dict) -> None:
    """A stage summary as a two-column table."""
    table = Table(title=title, show_header=False)
    for key, value in summary.items():
        table.add_row(key, str(value))
    console.print(table)


@app.command("embed")
def embed(
    ctx: typer.Context,
    shard: str | None = SHARD_OPTION,
    merge_only: bool = typer.Option(
        False, "--merge-only", help="Only rebuild the index from all shards (after --shard runs)."
    ),
) -> None:
    """Compute teacher features for every prepared narrative prompt (cached, resumable)."""
    from suradapter.teacher.embed import ShardSpec, open_cache, run_embed
    from suradapter.teacher.model import TeacherNotFoundError
    from suradapter.tracking import log_stage_run, tracking_configured

    everything = ctx.obj.load()
    params = everything.embed
    try:
        if merge_only:
            cache = open_cache(params)
            cache.rebuild_index()
            cache.save_index()
            console.print(
                f"index rebuilt: {len(cache)} features in {len(cache.shard_files)} shards"
            )
            return
        shard_spec = parsed_shard(shard) or ShardSpec.from_environment()
        summary = run_embed(params, shard_spec)
    except (ValueError, FileNotFoundError, TeacherNotFoundError) as err:
        fail(str(err))
    figures = summary.as_dict()
    print_summary("embed", figures)
    if tracking_configured(everything):
        metrics = {f"embed_{k}": v for k, v in figures.items() if isinstance(v, int | float)}
        run_name = "embed" if shard_spec.count == 1 else f"embed {shard_spec.writer}"
        log_stage_run(everything, run_name, metrics)


@app.command("encode")
def encode(
    ctx: typer.Context,
    shard: str | None = SHARD_OPTION,
) -> None:
    """Cache the frozen VAE latent distributions and text states of the training split."""
    from suradapter.frozen.encode import run_encode
    from suradapter.model.zoo import BaseModelNotFoundError

    params = ctx.obj.load()
    if params.train.cache == "off":
        Path(params.encode.cache_dir).mkdir(parents=True, exist_ok=True)
        console.print("encode: train.cache is off; sur train runs the frozen parts every step")
        return
    try:
        summary = run_encode(params, parsed_shard(shard))
    except (ValueError, FileNotFoundError, BaseModelNotFoundError) as err:
        fail(str(err))
    print_summary("encode", summary.as_dict())


@app.command("train")
def train(ctx: typer.Context) -> None:
    """Train the SUR-adapter on the frozen base (Accelerate; resumable; tracked in MLflow)."""
    import pyarrow.parquet as pq

    from suradapter.teacher.cache import MissingFeaturesError
    from suradapter.train.track import train_with_tracking

    params = ctx.obj.load()
    manifest = Path(params.embed.manifest)
    if not manifest.is_file():
        fail(f"prepared manifest {manifest} not found: run `sur prepare` first")
    table = pq.read_table(manifest, columns=["text", "split"]).to_pylist()
    grid_prompts = [row["text"] for row in table if row["split"] == "val"]
    try:
        result = train_with_tracking(params, grid_prompts[: params.train.grid_prompts])
    except (ValueError, FileNotFoundError, MissingFeaturesError) as err:
        fail(str(err))
    last = result.log[-1] if result.log else {}
    console.print(
        f"adapter saved to {result.output_dir} after {result.steps} steps "
        f"({result.seconds:.0f} s this session); last loss {last.get('total', float('nan')):.4f}"
    )


@app.command("export")
def export(
    ctx: typer.Context,
    adapter_dir: Path | None = typer.Option(None, "--adapter", help="Adapter folder (params)."),
    out_dir: Path | None = typer.Option(None, "--out", help="Output folder (params)."),
    fp16: bool | None = typer.Option(None, "--fp16/--fp32", help="Precision (params)."),
) -> None:
    """Export the adapted text path to ONNX and check its parity with PyTorch."""
    from suradapter.export.onnx_export import ExportParityError, export_adapter
    from suradapter.provenance import ADAPTER_CONFIG

    params = ctx.obj.load()
    settings = params.export
    if fp16 is not None:
        settings = settings.model_copy(update={"fp16": fp16})
    adapter_dir = adapter_dir or Path(settings.adapter_dir)
    out_dir = out_dir or Path(settings.output_dir)
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        fail(f"no adapter in {adapter_dir}: run `sur train` or pass --adapter", code=2)
    with console.status(f"exporting {adapter_dir} to ONNX"):
        try:
            result = export_adapter(params, adapter_dir, out_dir, settings)
        except ExportParityError as err:
            fail(str(err), code=1)
    report = result.report
    console.print(
        f"[green]✓[/] {out_dir}/text_path.onnx ({report['dtype']}, opset {report['opset']}, "
        f"inputs {', '.join(report['inputs'])}); parity max abs diff "
        f"{report['parity_max_abs_diff']:.2e} <= {report['parity_tolerance']:g}"
    )


@app.command("evaluate")
def evaluate(
    ctx: typer.Context,
    adapter_dir: Path | None = typer.Option(None, "--adapter", help="Adapter folder (params)."),
    production: bool = typer.Option(
        True, "--production/--no-production", help="Also compare with @production, if any."
    ),
    gate_exit: bool = typer.Option(
        True, "--gate-exit/--no-gate-exit", help="Exit 1 when a gate fails (DVC stage: no)."
    ),
) -> None:
    """Score the adapter against the base (and @production); exit 1 when a gate fails."""
    from suradapter.evaluate.run import require_adapter
    from suradapter.evaluate.tracked import evaluate_with_tracking
    from suradapter.registry import RegistryError

    params = ctx.obj.load()
    try:
        require_adapter(adapter_dir or Path(params.evaluate.adapter_dir))
    except FileNotFoundError as err:
        fail(f"{err}: run `sur train` or pass --adapter")
    try:
        with console.status("evaluating (generating and scoring images)"):
            result = evaluate_with_tracking(params, adapter_dir, use_production=production)
    except RegistryError as err:  # @production named but not fetchable or verifiable
        fail(str(err), code=1)
    for gate in result.gates:
        colour = "green" if gate.passed else "red"
        console.print(f"[{colour}]{gate.describe()}[/]", highlight=False)
    console.print(f"report: {params.evaluate.output_dir}/report.json (and report.md, plots)")
    if not result.passed:
        names = ", ".join(gate.describe() for gate in result.failed_gates)
        if gate_exit:
            fail(f"evaluation gates failed: {names}", code=1)
        console.print(f"[bold red]gates failed[/] (recorded in the report): {names}")


@app.command("serve")
def serve(
    ctx: typer.Context,
    host: str | None = typer.Option(None, "--host", help="Bind address (serving.host)."),
    port: int | None = typer.Option(None, "--port", help="Port (serving.port)."),
) -> None:
    """Serve models:/sur-adapter@production over HTTP: embed, generate, web page, metrics."""
    from serving.main import ServeError
    from serving.main import serve as run_server

    params = ctx.obj.load()
    try:
        run_server(params, host=host, port=port)
    except ServeError as err:
        fail(str(err))


@app.command("bootstrap-base")
def bootstrap_base_command(
    ctx: typer.Context,
    max_steps: int | None = typer.Option(
        None, "--max-steps", help="Stop early (smoke runs); the LR schedule keeps params.steps."
    ),
) -> None:
    """Train the shapes-world base model once (resumable) and write it with its provenance."""
    import sys

    from suradapter.shapes_base import bootstrap_base

    params = ctx.obj.load()
    command = " ".join(["sur", *sys.argv[1:]])
    metrics = bootstrap_base(params, command, max_steps=max_steps)
    console.print_json(data=metrics)


@app.command("run")
def run(
    ctx: typer.Context,
    out_dir: Path = typer.Option(Path("outputs/run"), help="Where the job writes summary.json."),
    stack: bool = typer.Option(
        True,
        "--stack/--no-stack",
        help="Start the local stack and track there (default); --no-stack: $MLFLOW_TRACKING_URI "
        "or .sur/mlflow.db, and $PREFECT_API_URL or an in-process Prefect API.",
    ),
) -> None:
    """The main job: stack up, then the retrain flow (DVC stages, register, promote by policy).

    Exits 0 when the pipeline ran, also when the new version failed its gates (it is then
    registered without @candidate and the summary says why); 1 when a stage or the stack failed.
    """
    from flows.main_job import run_main_job

    params = ctx.obj.load()
    try:
        summary = run_main_job(params, out_dir, console, use_stack=stack)
    except RuntimeError as err:
        fail(str(err), code=1)
    console.print(summary)


@app.command("deploy")
def deploy(
    ctx: typer.Context,
    retrain_cron: str | None = typer.Option(
        None, "--retrain-cron", help="Schedule of retrain/scheduled (default '0 3 * * 0')."
    ),
    check_cron: str | None = typer.Option(
        None, "--check-cron", help="Schedule of surd-data-check/on-data-change ('*/15 * * * *')."
    ),
    timezone: str | None = typer.Option(None, "--timezone", help="Time zone of both (UTC)."),
    pool: str | None = typer.Option(None, "--pool", help="Process work pool (sur-local)."),
    worker: bool = typer.Option(
        False, "--worker", help="Then run a process worker for the pool, in the foreground."
    ),
) -> None:
    """Deploy the retrain flow (cron) and the SURD data-change check to the stack's Prefect."""
    import sys

    from flows import settings
    from flows.deploy import deploy_flows, worker_command
    from flows.main_job import ensure_stack

    params = ctx.obj.load()
    try:
        ensure_stack(params, console)
    except RuntimeError as err:
        fail(str(err), code=1)
    pool = pool or settings.WORK_POOL
    deployed = deploy_flows(
        Path.cwd(),
        retrain_cron or settings.RETRAIN_CRON,
        check_cron or settings.CHECK_CRON,
        timezone,
        pool,
    )
    for item in deployed:
        console.print(
            f"[green]✓[/] deployment {item.name}: cron '{item.cron}', work pool {item.work_pool}",
            highlight=False,
            soft_wrap=True,
        )
    command = worker_command(str(Path(sys.executable).parent / "prefect"), pool)
    api = os.environ.get("PREFECT_API_URL", "")
    if not worker:
        console.print(
            "Scheduled runs wait for a worker, which runs each flow run as a subprocess in "
            f"{Path.cwd()}. Start one with `sur deploy --worker`, or:\n"
            f"  PREFECT_API_URL={api} {' '.join(command)}",
            highlight=False,
            soft_wrap=True,
        )
        return
    console.print(f"starting a worker: {' '.join(command)}", highlight=False)
    os.execv(command[0], command)


zoo_app = typer.Typer(
    help="Real architectures (SD1.5, SD2.1, a LLaMA teacher) with seeded random weights.",
    no_args_is_help=True,
)
app.add_typer(zoo_app, name="zoo")


@zoo_app.command("list")
def zoo_list() -> None:
    """Print the architectures `sur zoo build` knows, with what each is."""
    from suradapter.model.specs import architecture_names, architecture_spec

    table = Table(title="sur zoo: architectures as data (src/suradapter/model/configs)")
    table.add_column("name")
    table.add_column("kind")
    table.add_column("what it is", overflow="fold")
    for name in architecture_names():
        spec = architecture_spec(name)
        table.add_row(name, spec["kind"], spec["_comment"])
    console.print(table)


@zoo_app.command("build")
def zoo_build(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Architecture (see `sur zoo list`)."),
    out_dir: Path = typer.Argument(..., help="Folder to write (replaced as a whole)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random weights."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, float16 or bfloat16."),
    layers: int | None = typer.Option(
        None, "--layers", help="Teacher only: keep the first N decoder layers (fits small RAM)."
    ),
    vocabulary: Path | None = typer.Option(
        None,
        "--vocabulary",
        help="Folder with CLIP's vocab.json + merges.txt (default: the shipped base's tokenizer).",
    ),
) -> None:
    """Write a seeded random-weight folder of a real architecture (diffusers or transformers
    layout), for dry runs and benchmarks of the real code path without the weights."""
    from suradapter.devices import TORCH_DTYPES
    from suradapter.model.architectures import build_architecture

    if dtype not in TORCH_DTYPES:
        fail(f"--dtype {dtype}: use one of {', '.join(TORCH_DTYPES)}")
    source = vocabulary or Path(ctx.obj.load().bootstrap.output_dir) / "tokenizer"
    with console.status(f"building {name} (seeded random weights) into {out_dir}"):
        try:
            record = build_architecture(name, out_dir, source, seed, dtype, layers)
        except (KeyError, ValueError, OSError) as err:
            fail(str(err).strip("'\""))
    counts = ", ".join(f"{key} {count:,}" for key, count in record["parameters"].items())
    console.print(f"[green]✓[/] {out_dir}: {name} ({record['kind']}, {dtype}; {counts} parameters)")


@app.command("doctor")
def doctor(
    ctx: typer.Context,
    rows: int = typer.Option(16, "--rows", min=2, help="SURD rows in the slice."),
    steps: int = typer.Option(2, "--steps", min=1, help="Optimiser steps of the dry run."),
    batch_size: int | None = typer.Option(
        None, "--batch-size", min=1, help="Per-process batch of the dry run (train.batch_size)."
    ),
    source: Path | None = typer.Option(None, "--source", help="SURD folder (prepare.source)."),
    workdir: Path | None = typer.Option(
        None, "--workdir", help="Scratch folder, kept afterwards (default: a temporary one)."
    ),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the figures here."),
    profile: str | None = typer.Option(
        None, "--profile", help="Profile to check (same as `sur --profile P doctor`)."
    ),
) -> None:
    """Dry-run the real job: check the profile, then run every stage on a slice of the data
    on this machine's device, with per-stage time, memory and a full-run projection."""
    import tempfile

    from suradapter.doctor import DoctorError, print_report, run_doctor, write_report

    params = ctx.obj.load(profile)
    console.print(
        f"doctor: profile '{params.profile}', base {params.base_model.id}, teacher "
        f"{params.embed.model}; {rows} rows, {steps} step(s)",
        highlight=False,
    )

    def show(stage) -> None:
        console.print(
            f"  {stage.stage} done: {stage.seconds_per_unit:.3f} s/{stage.unit} on {stage.device}",
            highlight=False,
        )

    with tempfile.TemporaryDirectory(prefix="sur-doctor-") as scratch:
        try:
            report = run_doctor(
                params, workdir or Path(scratch), rows, steps, batch_size, source, show
            )
        except DoctorError as err:
            fail(str(err), code=1)
    print_report(report, console)
    if json_out:
        write_report(report, json_out)
        console.print(f"figures: {json_out}")
    if report.gate_verdict["passed"]:
        fail("the gates passed a dry-run adapter: tighten evaluate.gates", code=1)
    console.print("[green]doctor: ok[/] (every stage ran; the gates refused the dry-run adapter)")


registry_app = typer.Typer(help="The MLflow model registry: versions and aliases.")
app.add_typer(registry_app, name="registry")


@app.command("register")
def register(
    ctx: typer.Context,
    adapter_dir: Path | None = typer.Option(
        None, "--adapter", help="Adapter (evaluate.adapter_dir)."
    ),
    export_dir: Path | None = typer.Option(None, "--export", help="Export (export.output_dir)."),
    eval_dir: Path | None = typer.Option(None, "--eval", help="Eval report (evaluate.output_dir)."),
) -> None:
    """Register adapter + ONNX export + eval report as a new version (@candidate if it passed)."""
    from suradapter.registry import RegistryError, register_version

    params = ctx.obj.load()
    try:
        result = register_version(
            params,
            adapter_dir or Path(params.evaluate.adapter_dir),
            export_dir or Path(params.export.output_dir),
            eval_dir or Path(params.evaluate.output_dir),
        )
    except RegistryError as err:
        fail(str(err), code=1)
    verdict = "[green]passed[/]" if result.passed else "[red]failed[/]"
    aliases = ", ".join(f"@{alias}" for alias in result.aliases) or "none"
    console.print(
        f"registered {result.model_name} version {result.version}: gates {verdict}; "
        f"aliases: {aliases}"
    )
    for reason in result.reasons:
        console.print(f"  - {reason}", highlight=False)


@app.command("promote")
def promote_command(
    ctx: typer.Context,
    version: str | None = typer.Argument(None, help="Version number (default: --from alias)."),
    from_alias: str | None = typer.Option(
        None, "--from", help="Promote the version this alias names (default: candidate)."
    ),
) -> None:
    """Move @production to a version with a passing report; the old one becomes @previous."""
    from suradapter.registry import RegistryError, promote

    try:
        result = promote(ctx.obj.load(), version, from_alias)
    except RegistryError as err:
        fail(str(err), code=1)
    if not result.changed:
        console.print(f"{result.model_name} version {result.production} already is @production")
        return
    console.print(
        f"{result.model_name}: @production -> version {result.production}; "
        f"@previous -> {result.previous or 'none'}"
    )


@app.command("rollback")
def rollback_command(ctx: typer.Context) -> None:
    """Swap @production and @previous."""
    from suradapter.registry import RegistryError, rollback

    try:
        result = rollback(ctx.obj.load())
    except RegistryError as err:
        fail(str(err), code=1)
    console.print(
        f"{result.model_name}: rolled back; @production -> version {result.production}, "
        f"@previous -> {result.previous}"
    )


@registry_app.command("status")
def registry_status_command(ctx: typer.Context) -> None:
    """Print each alias of the registered model and the version it names."""
    from suradapter.registry import RegistryError, registry_status

    params = ctx.obj.load()
    try:
        aliases = registry_status(params)
    except RegistryError as err:
        fail(str(err), code=1)
    table = Table(title=f"registry: {params.registry.model_name}")
    table.add_column("alias")
    table.add_column("version")
    for alias, version in aliases.items():
        table.add_row(f"@{alias}", version)
    console.print(table if aliases else f"{params.registry.model_name}: no aliases set")
