"""The `zturbo` command: a thin Typer registry over the library.

Each command parses its options, calls one library function, and turns our typed
errors into a one-line message and an exit code. Heavy imports (torch, diffusers)
happen inside the commands, so `zturbo --help` is instant.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Callable, List, Optional

import typer
from rich.console import Console

from . import __version__
from .errors import ZTurboError

app = typer.Typer(
    name="zturbo",
    help="LoRA trainer for Z-Image Turbo. Trains with the de-distilling training adapter merged in, "
    "so the LoRA works on plain Turbo at 8 steps.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    epilog="Examples:\n\n  zturbo check configs/quickstart.toml\n\n  zturbo --version",
)
console = Console(stderr=True)


def fails_cleanly(fn: Callable) -> Callable:
    """Turn a ZTurboError into `error: ...` on stderr and the error's exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ZTurboError as exc:
            console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None

    return wrapper


def quiet_libraries() -> None:
    """Silence the progress bars and info logs of transformers / diffusers / hf_hub."""
    import os
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", module="bitsandbytes")
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    dlog.set_verbosity_error()
    dlog.disable_progress_bar()


def _version(value: bool) -> None:
    if value:
        typer.echo(f"zturbo-train {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """LoRA trainer for Z-Image Turbo."""


SetOption = typer.Option(None, "--set", help="Override a config key, e.g. --set train.lr=2e-4 (repeatable).")


@app.command(epilog="Example: zturbo check configs/quickstart.toml --set train.steps=50")
@fails_cleanly
def check(
    config: Path = typer.Argument(..., help="TOML config file."),
    overrides: Optional[List[str]] = SetOption,
) -> None:
    """Validate a config file and print the resolved settings as JSON."""
    from .config import load_config

    cfg = load_config(config, overrides or [])
    typer.echo(json.dumps(cfg.model_dump(mode="json"), indent=2))


data_app = typer.Typer(help="Look at a dataset before training on it.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("inspect", epilog="Examples:\n\n  zturbo data inspect examples/data --resolution 512 --trigger sks\n\n"
                  "  zturbo data inspect --config configs/quickstart.toml --json")
@fails_cleanly
def data_inspect(
    directory: Optional[Path] = typer.Argument(None, help="Folder of images with same-stem caption files."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Inspect the [[data]] tables of this config instead."),
    resolution: Optional[List[int]] = typer.Option(None, "--resolution", "-r", help="Training size(s) in px (repeatable; default 1024)."),
    caption_ext: Optional[str] = typer.Option(None, "--caption-ext", help="Caption file extension (default txt)."),
    trigger: Optional[str] = typer.Option(None, "--trigger", help="Trigger word: replaces [trigger] or is prepended."),
    default_caption: Optional[str] = typer.Option(None, "--default-caption", help="Caption for images without one."),
    strict: bool = typer.Option(False, "--strict", help="Treat warnings and skipped files as errors."),
    overrides: Optional[List[str]] = SetOption,
    rows: int = typer.Option(50, "--rows", help="Image rows to show (0: all)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """Show images, buckets, captions and every skipped file with its reason. Loads no model."""
    from .data.inspect import check_errors, datasets_from_options, inspect_datasets, render

    datasets = datasets_from_options(directory, config, overrides or [], resolution=resolution or None,
                                     caption_ext=caption_ext, trigger_word=trigger, default_caption=default_caption,
                                     strict=strict or None)
    inspection = inspect_datasets(datasets)
    if as_json:
        typer.echo(json.dumps(inspection.to_dict(), indent=2))
    else:
        render(inspection, Console(soft_wrap=False), rows)
    check_errors(inspection)


def run() -> None:  # pragma: no cover - `python -m zturbo_train`
    app(prog_name="zturbo")


if __name__ == "__main__":  # pragma: no cover
    run()
