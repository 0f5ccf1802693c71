"""How every command fails: one line ``error: ...`` and exit code 2, whether the error is a bad option
value caught by the command-line parser or a :class:`~nfsd_nerf.errors.UserError` raised by the
library; Ctrl-C exits 130 quietly."""

from __future__ import annotations

from contextlib import contextmanager

import typer
from typer.core import TyperGroup

from .errors import UserError


def _click_exceptions():
    """The exceptions module of the click that typer runs on (vendored as ``typer._click`` in recent typer)."""
    try:
        from typer._click import exceptions
    except ImportError:  # older typer: click itself
        from click import exceptions
    return exceptions


@contextmanager
def one_line_usage_errors():
    """Turn click's usage errors (an option value of the wrong type, an unknown option or command, a
    missing argument) into the one line and exit code 2 of every other error, instead of a usage box."""
    exceptions = _click_exceptions()
    try:
        yield
    except getattr(exceptions, "NoArgsIsHelpError", ()):  # bare `nfsd-nerf`: the help, as click shows it
        raise
    except exceptions.UsageError as exc:
        fail(_usage_message(exc, exceptions))


def _usage_message(exc, exceptions) -> str:
    """``--steps: 'abc' is not a valid integer``; other usage errors as click words them, with where to look."""
    param = getattr(exc, "param", None)
    if isinstance(exc, exceptions.BadParameter) and not isinstance(exc, exceptions.MissingParameter) and param:
        detail = exc.message
        errors = getattr(exc.__cause__, "errors", None)  # typer's pydantic coercion: the value is in the cause
        first = (errors() or [{}])[0] if callable(errors) else {}
        if "input" in first:
            detail = str(first["msg"]).split(",")[0]
            if detail.startswith("Input should be "):
                detail = f"{first['input']!r} is not {detail.removeprefix('Input should be ')}"
        return f"{exc.param_hint or '/'.join(param.opts)}: {detail}"
    where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
    return f"{exc.format_message()}{where}"


class OneLineErrors(TyperGroup):
    """Typer's command group with usage errors in one line (:func:`one_line_usage_errors`), so that they
    read like every other error, through the console script and ``CliRunner`` alike."""

    def make_context(self, *args, **kwargs):
        with one_line_usage_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        with one_line_usage_errors():
            return super().invoke(ctx)


def fail(message: str) -> None:
    """Print a one-line error and exit with code 2."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def run_command(action):
    """Run a command body: user errors become one line + exit 2, Ctrl-C exits 130 quietly."""
    from .guidance.hub import check_hub_environment
    from .runtime import prepare_process

    prepare_process()  # large-tensor CPU work in every command: ~2x on the hash grid
    try:
        check_hub_environment()  # before anything imports huggingface_hub, which fails on them with a traceback
        return action()
    except UserError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        typer.secho("interrupted", fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(code=130)
