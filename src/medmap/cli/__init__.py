"""The ``medmap`` command line. Sub-command groups live in the modules of this package and register here.

User errors (:class:`medmap.errors.MedmapError`) print one line and exit with code 2.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from medmap.errors import MedmapError

app = typer.Typer(
    name="medmap",
    help="Map where a language model stores medical knowledge.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err_console = Console(stderr=True)


def _register() -> None:
    # Imported lazily so `medmap --help` stays fast and one broken group cannot hide the others.
    import importlib

    for mod in ("core", "concepts", "represent", "causal", "map", "report", "plan", "experiments"):
        try:
            module = importlib.import_module(f"medmap.cli.{mod}")
        except ModuleNotFoundError as e:
            if e.name == f"medmap.cli.{mod}":
                continue
            raise
        module.register(app)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    _register()
    try:
        app(args=argv, standalone_mode=False, prog_name="medmap")
    except MedmapError as e:
        _error_line(str(e))
        return e.exit_code
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort:
        err_console.print("aborted")
        return 130
    except KeyboardInterrupt:
        err_console.print("interrupted; run the same command again to resume")
        return 130
    except Exception as e:  # click usage errors
        import click

        # typer >= 0.20 vendors click: its usage errors derive from typer.TyperException
        usage = (click.exceptions.ClickException, typer.TyperException)
        if isinstance(e, usage) and hasattr(e, "show"):
            if type(e).__name__ == "NoArgsIsHelpError" or not hasattr(e, "format_message"):
                e.show()  # `medmap` alone prints the help
            else:  # a bad option value, a missing option ...: one line like every user error
                ctx = getattr(e, "ctx", None)
                cmd = ctx.command_path if ctx is not None else "medmap"
                _error_line(f"{e.format_message()} (see `{cmd} --help`)")
            return 2
        from medmap.batching import is_oom

        if is_oom(e):  # a stage without automatic back-off ran out of memory
            _error_line(
                f"out of memory ({type(e).__name__}) (lower --batch-size, use --dtype bfloat16, "
                "or shard the model with --device-map auto; finished cells are kept, so the "
                "same command resumes)"
            )
            return 2
        raise
    return 0


def _error_line(message: str) -> None:
    from rich.markup import escape

    # one line however long (no wrapping at the console width); the message is not markup
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


if __name__ == "__main__":
    sys.exit(main())
