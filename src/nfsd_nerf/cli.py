"""The ``nfsd-nerf`` command line (Typer). Commands are thin: parse, validate, call the library."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from . import __version__
from .errors import UserError

app = typer.Typer(
    name="nfsd-nerf",
    help="Text-to-3D with Noise-Free Score Distillation: train a hash-grid NeRF from a prompt, "
    "then export meshes and turntable videos.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"nfsd-nerf {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Optional[bool] = typer.Option(
        None, "--version", callback=_version_callback, is_eager=True, help="Show the version and exit."
    ),
) -> None:
    """nfsd-nerf: text-to-3D with Noise-Free Score Distillation."""


def fail(message: str) -> None:
    """Print a one-line error and exit with code 2."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)
