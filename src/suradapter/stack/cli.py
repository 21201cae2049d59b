"""`sur stack up | down | status`: the typer sub-app that `suradapter.cli` mounts.

Reads `params.stack` through the parent's `ctx.obj.load()` (the CLI's `CliState`).
"""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from suradapter.stack.lifecycle import ServiceStatus, down, status, up
from suradapter.stack.services import StackError
from suradapter.stack.settings import SERVICE_NAMES, StackParams, StackPaths

stack_app = typer.Typer(
    help="The local stack: Prefect server, MLflow tracking server, S3 server and, with "
    "stack.postgres_port, their PostgreSQL (loopback).",
    no_args_is_help=True,
)
console = Console()
ONLY_HELP = f"Comma-separated subset of {', '.join(SERVICE_NAMES)} (default: all configured)."
STATE_COLOURS = {"running": "green", "stopped": "dim", "unhealthy": "red", "dead": "red"}


def _stack_params(ctx: typer.Context) -> StackParams:
    return ctx.obj.load().stack


def _names(only: str | None) -> list[str] | None:
    return [name.strip() for name in only.split(",") if name.strip()] if only else None


def _fail(message: str, code: int = 1) -> typer.Exit:
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def _table(statuses: list[ServiceStatus]) -> Table:
    table = Table("service", "state", "url", "pid", "note")
    for item in statuses:
        colour = STATE_COLOURS[item.state]
        note = ", ".join(filter(None, [item.note, "basic-auth" if item.auth else ""]))
        pid = str(item.pid) if item.pid else "-"
        table.add_row(item.name, f"[{colour}]{item.state}[/]", item.url, pid, note)
    return table


@stack_app.command("up")
def stack_up(
    ctx: typer.Context,
    only: str | None = typer.Option(None, "--only", help=ONLY_HELP),
    auth: bool | None = typer.Option(
        None, "--auth/--no-auth", help="MLflow basic-auth (default: params stack.auth)."
    ),
) -> None:
    """Start the stack (idempotent) and wait until every service is healthy."""
    params = _stack_params(ctx)
    try:
        with console.status("starting the stack") as progress:
            statuses = up(params, _names(only), auth=auth, on_progress=progress.update)
    except StackError as err:
        _fail(str(err))
    console.print(_table(statuses))
    paths = StackPaths.of(params.state_dir)
    console.print(f"S3 keys: {paths.s3_credentials} (0600)", highlight=False)
    if any(item.auth for item in statuses):
        console.print(f"MLflow admin: {paths.mlflow_admin} (0600)", highlight=False)
    if any(item.name == "postgres" for item in statuses):
        console.print(f"PostgreSQL login: {paths.postgres_login} (0600)", highlight=False)


@stack_app.command("down")
def stack_down(
    ctx: typer.Context, only: str | None = typer.Option(None, "--only", help=ONLY_HELP)
) -> None:
    """Stop what `sur stack up` started (data stays in the state dir)."""
    try:
        outcome = down(_stack_params(ctx), _names(only))
    except StackError as err:
        _fail(str(err))
    for name, what in outcome:
        console.print(f"{name}: {what}", highlight=False)


@stack_app.command("status")
def stack_status(
    ctx: typer.Context, only: str | None = typer.Option(None, "--only", help=ONLY_HELP)
) -> None:
    """Print each service's URL, pid and health; exit 1 when a started service is unhealthy."""
    try:
        statuses = status(_stack_params(ctx), _names(only))
    except StackError as err:
        _fail(str(err))
    console.print(_table(statuses))
    if not all(item.ok for item in statuses):
        raise typer.Exit(1)
