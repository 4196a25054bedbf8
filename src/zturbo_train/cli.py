"""The `zturbo` command: a thin Typer registry over the library.

Each command parses its options, calls one library function, and turns our typed
errors into a one-line message and an exit code. Heavy imports (torch, diffusers)
happen inside the commands, so `zturbo --help` is instant.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Callable, List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from . import __version__
from .errors import ZTurboError
from .zimage import TURBO_REPO


class _FlagsShowNoType:
    """Typer 0.29 prints `<bool>` beside flags (--dry-run, --help), which take no value: print nothing there."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        return params


class _Command(_FlagsShowNoType, TyperCommand):
    pass


class _Group(_FlagsShowNoType, TyperGroup):
    pass


class _Typer(typer.Typer):
    """typer.Typer whose groups and commands show flags without a value type."""

    def __init__(self, **kwargs):
        super().__init__(cls=_Group, **kwargs)

    def command(self, *args, **kwargs):
        return super().command(*args, cls=kwargs.pop("cls", _Command), **kwargs)


app = _Typer(
    name="zturbo",
    help="LoRA trainer for Z-Image Turbo. Trains with the de-distilling training adapter merged in, "
    "so the LoRA works on plain Turbo at 8 steps.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    epilog="Examples (the quick start: under a minute on a quiet 2-core CPU, no download; "
    "`zturbo COMMAND --help` for each command):\n\n"
    "  zturbo train configs/quickstart.toml\n\n"
    "  zturbo sample --model builtin:tiny --lora output/quickstart/quickstart.safetensors --prompt 'sks a red square' "
    "--width 64 --height 64\n\n"
    "  zturbo report output/quickstart\n\n"
    "  zturbo check configs/quickstart.toml",
)
console = Console(stderr=True)


def fails_cleanly(fn: Callable) -> Callable:
    """Turn a ZTurboError into `error: ...` on stderr and the error's exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ZTurboError as exc:
            # escape(): messages name config tables such as `[model] path`, which are not markup.
            console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None

    return wrapper


def quiet_libraries() -> None:
    """Silence the progress bars and info logs of transformers / diffusers / hf_hub."""
    import logging
    import os
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", module="bitsandbytes")
    # bitsandbytes warns at import about optional CPU kernels that we never use.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
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
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
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


@app.command(
    epilog="Examples:\n\n  zturbo train configs/quickstart.toml\n\n"
    "  zturbo train configs/zimage-turbo-lora.toml --set train.lr=2e-4 --set data.dir=~/my-photos\n\n"
    "  zturbo train configs/zimage-turbo-lora.toml --resume"
)
@fails_cleanly
def train(
    config: Path = typer.Argument(..., help="TOML config file (see configs/)."),
    overrides: Optional[List[str]] = SetOption,
    resume: bool = typer.Option(False, "--resume", help="Continue the run in train.output_dir from its newest state."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a run already in train.output_dir."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check config and dataset, print the plan, train nothing."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars; errors only."),
) -> None:
    """Train a LoRA: merge the training adapter, cache latents and captions, train, save, preview."""
    from .config import load_config
    from .preflight import check_train

    cfg = load_config(config, overrides or [])
    if not dry_run:
        check_train(cfg, resume, overwrite)  # before torch, diffusers and the dataset cache: a typo fails in a second
    quiet_libraries()
    if dry_run:
        from .train.dry_run import dry_run as plan_run

        plan_run(cfg, console)
        return
    from .train.loop import run as train_run

    try:
        result = train_run(cfg, resume=resume, overwrite=overwrite, quiet=quiet)
    except KeyboardInterrupt:  # Ctrl-C while setting up, or a second Ctrl-C: stop at once
        import os

        if os.environ.get("RANK", "0") == "0":
            console.print(
                f"[yellow]interrupted[/]; files already written are complete. Go on with: "
                f"{escape(again_command(config, overrides or [], cfg.train.output_dir))}",
                highlight=False,
                soft_wrap=True,
            )
        raise typer.Exit(130) from None
    if result.interrupted:
        if result.rank == 0:
            console.print(
                f"[yellow]stopped at step {result.steps_done}[/]; state and LoRA saved in "
                f"{escape(str(result.run_dir))}. Resume with: "
                f"{escape(again_command(config, overrides or [], result.run_dir))}",
                highlight=False,
                soft_wrap=True,
            )
        raise typer.Exit(130)
    if not quiet and result.rank == 0:
        print_summary(result)


def again_command(config: Path, overrides: List[str], run_dir: Path) -> str:
    """The command that goes on with a stopped run: the same config and --set, plus --resume when a state was saved."""
    import shlex

    from .train.state import RunFolder, latest_state

    run = RunFolder(Path(run_dir))
    flag = ["--resume"] if latest_state(run) is not None else ["--overwrite"] if run.holds_run() else []
    return shlex.join(["zturbo", "train", str(config), *[a for o in overrides for a in ("--set", o)], *flag])


def print_summary(result) -> None:
    """The end-of-run table: time, the losses (labelled: the bar showed the smoothed one), where the files are."""
    from rich.table import Table

    from .drift import DRIFT_LABEL
    from .drift import summary as drift_summary
    from .monitor.records import LAST_LOSS_LABEL, LOSS_LABEL

    def loss(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    table = Table(title="training done", show_header=False)
    table.add_row("steps", str(result.steps_done))
    table.add_row("time", f"{result.seconds:.1f} s")
    table.add_row(LOSS_LABEL, loss(result.smoothed_loss))
    table.add_row(LAST_LOSS_LABEL, loss(result.final_loss))
    if result.turbo_drift is not None:
        table.add_row(DRIFT_LABEL, drift_summary(result.turbo_drift))
    table.add_row("LoRA", str(result.lora_path))
    table.add_row("run folder", str(result.run_dir))
    console.print(table)


@app.command(
    epilog="Examples:\n\n  zturbo download\n\n  zturbo download --bf16\n\n"
    "  zturbo download --adapter v1 --dir /data/z-image-turbo\n\n  zturbo download --model none --adapter v2"
)
@fails_cleanly
def download(
    model: str = typer.Option(
        TURBO_REPO, "--model", help="Hub id of the Z-Image diffusers repo, or none (adapter only)."
    ),
    adapter: str = typer.Option(
        "v2", "--adapter", help="Training adapter: v2 (usual), v1, owner/repo/file.safetensors, or none."
    ),
    folder: Optional[Path] = typer.Option(
        None,
        "--dir",
        show_default=False,
        help="Folder for the model (default: $ZTURBO_HOME/models/<owner>--<name>, where `zturbo train` looks).",
    ),
    revision: Optional[str] = typer.Option(
        None, "--revision", help="Branch, tag or commit of the model (default: main)."
    ),
    token: Optional[str] = typer.Option(
        None,
        "--token",
        show_default=False,
        help="Hub token (default: HF_TOKEN or `hf auth login`); never printed or saved.",
    ),
    bf16: bool = typer.Option(
        False, "--bf16", help="Store the transformer as bf16 shards (about 12 GB instead of 24.6 GB)."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or summary."),
) -> None:
    """Download Z-Image Turbo and the training adapter: resumable, hash-verified, optionally bf16."""
    from .hub.download import download_all, rich_reporter, summary_lines, summary_table

    with rich_reporter(console, enabled=not quiet) as reporter:
        results = download_all(model, adapter, folder, revision=revision, token=token, bf16=bf16, reporter=reporter)
    if not quiet:
        console.print(summary_table(results))
        for line in summary_lines(results, custom_dir=folder is not None):
            console.print(line, highlight=False, soft_wrap=True, markup=False)


data_app = _Typer(
    help="Look at a dataset before training on it.",
    no_args_is_help=True,
    epilog="Example: zturbo data inspect examples/data --resolution 512 --trigger sks",
)
app.add_typer(data_app, name="data")


@data_app.command(
    "inspect",
    epilog="Examples:\n\n  zturbo data inspect examples/data --resolution 512 --trigger sks\n\n"
    "  zturbo data inspect --config configs/quickstart.toml --json",
)
@fails_cleanly
def data_inspect(
    directory: Optional[Path] = typer.Argument(None, help="Folder of images with same-stem caption files."),
    config: Optional[Path] = typer.Option(
        None, "--config", "-c", help="Inspect the \\[\\[data]] tables of this config instead."
    ),
    resolution: Optional[List[int]] = typer.Option(
        None, "--resolution", "-r", help="Training size(s) in px (repeatable; default 1024)."
    ),
    caption_ext: Optional[str] = typer.Option(None, "--caption-ext", help="Caption file extension (default txt)."),
    trigger: Optional[str] = typer.Option(
        None, "--trigger", help="Trigger word: replaces \\[trigger] or is prepended."
    ),
    default_caption: Optional[str] = typer.Option(None, "--default-caption", help="Caption for images without one."),
    strict: bool = typer.Option(False, "--strict", help="Treat warnings and skipped files as errors."),
    overrides: Optional[List[str]] = SetOption,
    rows: int = typer.Option(50, "--rows", help="Image rows to show (0: all)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """Show images, buckets, captions and every skipped file with its reason. Loads no model."""
    from .data.inspect import check_errors, datasets_from_options, inspect_datasets, render

    datasets = datasets_from_options(
        directory,
        config,
        overrides or [],
        resolution=resolution or None,
        caption_ext=caption_ext,
        trigger_word=trigger,
        default_caption=default_caption,
        strict=strict or None,
    )
    inspection = inspect_datasets(datasets, console)
    if as_json:
        typer.echo(json.dumps(inspection.to_dict(), indent=2))
    else:
        render(inspection, Console(soft_wrap=False), rows)
    check_errors(inspection)


def _report(message: str) -> None:
    """Library progress lines: written files to stdout (for scripts), notes and warnings to stderr."""
    if message.startswith("wrote "):
        typer.echo(message)
    else:
        console.print(message, markup=False, highlight=False, soft_wrap=True)


LoraOption = typer.Option(
    None,
    "--lora",
    "-l",
    help="LoRA file as PATH[:STRENGTH] (repeatable): any key style "
    "(comfyui, diffusers, musubi/kohya, ComfyUI's fused qkv), LoKr, LoHa or .diff patches.",
)
AllowPartialOption = typer.Option(
    False,
    "--allow-partial",
    help="Use a LoRA that fits this model only in part "
    "(warn and skip the keys it cannot place) instead of refusing it.",
)
FORMAT_HELP = (
    "Key style of the --to-lora file. comfyui (default): loads fully in ComfyUI v0.3.76+ and diffusers. "
    "diffusers: alpha baked in; loads fully in diffusers and ComfyUI builds after v0.3.77. "
    "musubi (alias kohya): musubi-tuner's lora_unet_ style; loads fully in musubi-tuner and diffusers, "
    "ComfyUI drops its attention weights. See `zturbo inspect` and the README table."
)


lab_app = typer.Typer(
    help="The Turbo lab: a distilled tiny Z-Image to measure what LoRAs do to few-step quality (TURBO.md).",
    no_args_is_help=True,
    rich_markup_mode="rich",
)
app.add_typer(lab_app, name="lab")


@lab_app.command("build", epilog="Examples:\n\n  zturbo lab build lab\n\n  zturbo lab build lab-quick --quick")
@fails_cleanly
def lab_build(
    out: Path = typer.Argument(..., help="Folder for the lab (student/, teacher/, adapter.safetensors, data/)."),
    quick: bool = typer.Option(False, "--quick", help="The CI-sized build (fewer iterations, same code)."),
    adapter_only: bool = typer.Option(False, "--adapter-only", help="Retrain only the adapter of a built lab."),
) -> None:
    """Build the distilled tiny Z-Image: VAE, teacher, Turbo student, de-distill adapter, data."""
    import torch

    from .lab.build import LabSettings, build_lab, rebuild_adapter

    quiet_libraries()
    torch.set_num_threads(1)  # tiny models: one thread is fastest on a shared CPU
    (rebuild_adapter if adapter_only else build_lab)(out, LabSettings.quick() if quick else LabSettings(), log=_report)


@lab_app.command(
    "run", epilog="Examples:\n\n  zturbo lab run lab\n\n  zturbo lab run lab --seeds 1 --strategies direct,merge"
)
@fails_cleanly
def lab_run(
    lab_dir: Path = typer.Argument(..., help="A folder made by `zturbo lab build`."),
    seeds: str = typer.Option("1,2,3", "--seeds", help="Comma-separated training seeds."),
    strategies: str = typer.Option("direct,merge,live,base", "--strategies", help="Comma-separated strategies."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Training steps of each user LoRA [default: 240]."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate of each user LoRA [default: 2e-3]."),
    quick: bool = typer.Option(False, "--quick", help="Shorter runs, fewer samples (the CI-sized variant)."),
) -> None:
    """Train user LoRAs on the lab's new concept with `zturbo train` and measure them (lab-result.json per run)."""
    import torch

    from .lab.experiment import RunSettings, run_lab

    quiet_libraries()
    torch.set_num_threads(1)
    run_lab(lab_dir, RunSettings.from_options(seeds, strategies, steps, lr, quick), log=_report)


@lab_app.command("report", epilog="Example:\n\n  zturbo lab report lab --plots docs/turbo")
@fails_cleanly
def lab_report(
    lab_dir: Path = typer.Argument(..., help="A lab folder after `zturbo lab run`."),
    plots: Optional[Path] = typer.Option(None, "--plots", help="Write the curves as PNGs here."),
) -> None:
    """Print the table (mean and min-max over seeds) and optionally plot the curves."""
    from .lab.report import report

    typer.echo(report(lab_dir, plots))


@app.command(
    epilog="Examples:\n\n  zturbo sample --model builtin:tiny --prompt 'a red cube' --width 64 --height 64\n\n"
    "  zturbo sample --model builtin:tiny --lora output/quickstart/quickstart.safetensors:0.8 --prompt 'sks a red "
    "square' "
    "--count 4 --seed 1 --width 64 --height 64 --compare\n\n"
    "  zturbo sample --lora output/zimage-turbo-lora/my_lora.safetensors:0.8 --prompt 'sks dog on a beach' --count "
    "4\n\n"
    "  zturbo sample --lora a.safetensors --lora b.safetensors:0.5 --prompts prompts.txt --compare --low-mem"
)
@fails_cleanly
def sample(
    loras: Optional[List[str]] = LoraOption,
    prompt: Optional[List[str]] = typer.Option(None, "--prompt", "-p", help="Prompt (repeatable)."),
    prompts_file: Optional[Path] = typer.Option(
        None, "--prompts", help="UTF-8 text file, one prompt per line (# comments)."
    ),
    model: str = typer.Option(TURBO_REPO, "--model", "-m", help="Z-Image folder, downloaded Hub id, or builtin:tiny."),
    steps: int = typer.Option(8, "--steps", help="Sampling steps (Turbo: 8)."),
    guidance: float = typer.Option(0.0, "--guidance", help="CFG scale; 0 (Turbo's default) runs no negative pass."),
    seed: Optional[int] = typer.Option(
        None, "--seed", help="First seed; image k of each prompt uses seed + k (default: random)."
    ),
    count: int = typer.Option(1, "--count", "-n", help="Images per prompt."),
    width: int = typer.Option(1024, "--width", help="Width in px (multiple of 16)."),
    height: int = typer.Option(1024, "--height", help="Height in px (multiple of 16)."),
    negative: str = typer.Option("", "--negative", help="Negative prompt (used when --guidance > 0)."),
    out: Path = typer.Option(Path("samples"), "--out", "-o", help="Folder for the PNGs (never overwritten)."),
    compare: bool = typer.Option(
        False, "--compare", help="Also write a grid of the same seeds without and with the LoRAs."
    ),
    low_mem: bool = typer.Option(
        False,
        "--low-mem",
        help="CPU offload for small GPUs (model offload, or sequential when the transformer does not fit).",
    ),
    device: str = typer.Option("auto", "--device", help="auto, cuda, cuda:N, mps or cpu."),
    dtype: str = typer.Option("bf16", "--dtype", help="bf16, fp16 or fp32."),
    batch_size: int = typer.Option(1, "--batch-size", help="Images per forward pass."),
    allow_partial: bool = AllowPartialOption,
    drift: bool = typer.Option(
        False,
        "--drift",
        help="Report turbo_drift per image, with and without the LoRAs "
        "(a heuristic to compare checkpoints; see TURBO.md).",
    ),
) -> None:
    """Make images with Z-Image Turbo and LoRAs; settings go into each PNG's metadata."""
    from .preflight import SampleSettings, check_sample, parse_lora_spec, read_prompts_file

    texts = list(prompt or []) + (read_prompts_file(prompts_file) if prompts_file else [])
    settings = SampleSettings(
        prompts=texts,
        loras=[parse_lora_spec(s) for s in loras or []],
        model=model,
        steps=steps,
        guidance=guidance,
        seed=seed,
        count=count,
        width=width,
        height=height,
        negative=negative,
        out_dir=out,
        compare=compare,
        low_mem=low_mem,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        allow_partial=allow_partial,
        drift=drift,
    )
    check_sample(settings)  # before torch and diffusers are imported: a bad option fails in a second
    quiet_libraries()
    from .commands.sample import sample as run_sample

    run_sample(settings, log=_report)


@app.command(
    epilog="Examples:\n\n  zturbo merge --model builtin:tiny --lora output/quickstart/quickstart.safetensors:0.8 "
    "--out merged-tiny\n\n"
    "  zturbo merge --lora my-lora.safetensors:0.8 --out merged-turbo\n\n"
    "  zturbo merge --lora a.safetensors --lora b.safetensors:0.5 --to-lora ab.safetensors\n\n"
    "  zturbo merge --lora lora.safetensors --to-lora lora-musubi.safetensors --format musubi\n\n"
    "  zturbo merge --adapter v2 --out z-image-dedistilled --dtype bf16\n\n"
    "  zturbo merge --ema output/my-run --ema-half-life 200 --to-lora my-run-ema.safetensors"
)
@fails_cleanly
def merge(
    loras: Optional[List[str]] = LoraOption,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for the merged diffusers model."),
    model: str = typer.Option(
        TURBO_REPO, "--model", "-m", help="Base: Z-Image folder, downloaded Hub id, or builtin:tiny."
    ),
    adapter: Optional[str] = typer.Option(
        None,
        "--adapter",
        help="Also fold in a training adapter (v1, v2, file, builtin:tiny-adapter): a de-distilled base.",
    ),
    adapter_weight: float = typer.Option(1.0, "--adapter-weight", help="Strength of --adapter."),
    dtype: Optional[str] = typer.Option(
        None, "--dtype", help="bf16, fp16 or fp32 (model default bf16; --to-lora default: exact fp32, or as read)."
    ),
    to_lora: Optional[Path] = typer.Option(
        None, "--to-lora", help="Merge the LoRAs into one LoRA file instead of into the model."
    ),
    style: Optional[str] = typer.Option(None, "--format", help=FORMAT_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
    allow_partial: bool = AllowPartialOption,
    ema: Optional[Path] = typer.Option(
        None, "--ema", help="A run folder: write the post-hoc EMA of its saved LoRAs (step order) to --to-lora."
    ),
    ema_decay: Optional[float] = typer.Option(None, "--ema-decay", help="Decay per step of --ema, e.g. 0.999."),
    ema_half_life: Optional[float] = typer.Option(
        None, "--ema-half-life", help="Or the half-life of --ema in steps (decay^half_life = 1/2), e.g. 100."
    ),
) -> None:
    """Fold LoRAs into the base model, merge several LoRAs into one, convert a LoRA's key style, or average a
    run's saved LoRAs (post-hoc EMA)."""
    from .preflight import check_merge, parse_lora_spec

    specs = [parse_lora_spec(s) for s in loras or []]
    # before torch is imported: a bad option fails in a second
    check_merge(specs, out, to_lora, adapter, style, dtype, (ema, ema_decay, ema_half_life))
    quiet_libraries()
    from .commands.merge import merge_into_model, merge_to_lora

    if ema is not None:
        from .commands.ema import post_hoc_ema

        post_hoc_ema(
            ema, to_lora, ema_decay, ema_half_life, style or "comfyui", dtype, overwrite=overwrite, log=_report
        )
    elif to_lora is not None:
        merge_to_lora(
            specs,
            to_lora,
            style=style or "comfyui",
            dtype=dtype,
            model=model,
            model_required=model != TURBO_REPO,
            overwrite=overwrite,
            log=_report,
            allow_partial=allow_partial,
        )
    else:
        merge_into_model(
            specs,
            out,
            model=model,
            adapter=adapter,
            adapter_weight=adapter_weight,
            dtype=dtype or "bf16",
            overwrite=overwrite,
            log=_report,
            allow_partial=allow_partial,
        )


@app.command(
    epilog="Examples:\n\n  zturbo bench --model builtin:tiny --steps 3 --warmup 1\n\n"
    "  zturbo bench --preset high --preset 16gb --preset 8gb -r 1024 -r 512 --out bench.json\n\n"
    "  zturbo bench --preset 16gb --set train.attention_backend=sdpa-flash --set train.compile=false"
)
@fails_cleanly
def bench(
    model: str = typer.Option(
        "synthetic",
        "--model",
        "-m",
        help="synthetic (random, real shapes, built on the GPU), synthetic:tiny, builtin:tiny, or a Z-Image folder.",
    ),
    presets: Optional[List[str]] = typer.Option(
        None, "--preset", "-p", help="Memory preset(s): auto, high, 24gb, 16gb, 12gb, 8gb (repeatable; default auto)."
    ),
    resolutions: Optional[List[int]] = typer.Option(
        None, "--resolution", "-r", help="Square side(s) in px (repeatable; default 1024 and 512, 64 for tiny models)."
    ),
    ranks: Optional[List[int]] = typer.Option(None, "--rank", help="LoRA rank(s) (repeatable; default 32)."),
    batches: Optional[List[int]] = typer.Option(
        None, "--batch-size", "-b", help="Batch size(s) (repeatable; default 1)."
    ),
    overrides: Optional[List[str]] = SetOption,
    steps: int = typer.Option(8, "--steps", help="Timed steps per row (the median is reported)."),
    warmup: int = typer.Option(3, "--warmup", help="Untimed steps first (compilation happens here)."),
    sample_steps: int = typer.Option(8, "--sample-steps", help="Sampling steps to time per preset (0: skip)."),
    sample_size: Optional[int] = typer.Option(
        None, "--sample-size", help="Side of the sampled image (default: the largest resolution)."
    ),
    caption_tokens: int = typer.Option(128, "--caption-tokens", help="Caption length of the random text embeddings."),
    device: str = typer.Option("auto", "--device", help="auto, cuda, cuda:N or cpu."),
    out: Path = typer.Option(
        Path("bench.json"), "--out", "-o", help="JSON file for the results (rewritten after every row)."
    ),
    label: Optional[str] = typer.Option(
        None,
        "--label",
        help="Name the rows of this run as a variant (kept apart from the preset's own rows when comparing).",
    ),
    profile: bool = typer.Option(
        False, "--profile", help="Also profile 2 steps per row: device time by kernel class, top kernels (in the JSON)."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only the JSON file; no table."),
) -> None:
    """Time the training step and 8-step sampling per memory preset; print a table, write JSON."""
    from .commands.bench import BenchSettings, render, run_bench

    quiet_libraries()
    settings = BenchSettings(
        model=model,
        presets=list(presets or ["auto"]),
        resolutions=list(resolutions or []),
        ranks=list(ranks or [32]),
        batches=list(batches or [1]),
        overrides=list(overrides or []),
        steps=steps,
        warmup=warmup,
        sample_steps=sample_steps,
        sample_size=sample_size,
        caption_tokens=caption_tokens,
        device=device,
        out=out,
        profile=profile,
        label=label,
    )
    log = (lambda message: None) if quiet else (lambda message: console.print(message, highlight=False, markup=False))
    doc = run_bench(settings, log)
    if not quiet:
        for table in render(doc):
            Console().print(table)
        console.print(f"wrote {out}", highlight=False)


@app.command(
    epilog="Examples:\n\n  zturbo inspect output/quickstart/quickstart.safetensors\n\n"
    "  zturbo inspect my_lora.safetensors --model builtin:tiny --json\n\n"
    "  zturbo inspect a.safetensors b.safetensors --model Tongyi-MAI/Z-Image-Turbo"
)
@fails_cleanly
def inspect(
    files: List[Path] = typer.Argument(..., help="LoRA / adapter .safetensors file(s)."),
    model: Optional[str] = typer.Option(
        None,
        "--model",
        "-m",
        help="Also check the fit against this model "
        "(Z-Image folder, downloaded Hub id, or builtin:tiny); reads headers only.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
) -> None:
    """Show a LoRA's key style, modules, ranks, alphas, metadata and which tools load it fully."""
    from .commands.inspect import inspect_file
    from .lora.inspect import render

    reports = [inspect_file(path, model) for path in files]
    if as_json:
        typer.echo(json.dumps(reports if len(reports) > 1 else reports[0], indent=2))
        return
    for report in reports:
        for line in render(report):
            typer.echo(line)


@app.command(
    epilog="Examples:\n\n  zturbo report output/quickstart\n\n  zturbo report output/zimage-turbo-lora --no-plots"
)
@fails_cleanly
def report(
    run_dir: Path = typer.Argument(..., help="A run folder (train.output_dir), finished, stopped or still training."),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Redraw loss.png and the preview timelines first."),
) -> None:
    """Write RUN_DIR/report.html: settings, loss plot, previews (prompts x steps), files, next commands."""
    from .commands.report import report_run

    typer.echo(f"wrote {report_run(run_dir, plots=plots)}")


def run() -> None:  # pragma: no cover - `python -m zturbo_train`
    app(prog_name="zturbo")


if __name__ == "__main__":  # pragma: no cover
    run()
