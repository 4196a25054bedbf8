"""`zturbo lab run`: user LoRAs on the lab's new concept, trained with the real `zturbo train`, measured.

Strategies (each a generated config run through `train.loop.run`, several seeds):
- direct: on the Turbo student, `adapter = "none"` (what breaks Turbo in practice);
- merge: over the lab's de-distill adapter, merged (the trainer's default);
- live: over the adapter kept as a frozen branch (same maths, another code path);
- base: on the teacher (the un-distilled base model), then used on the student: the
  "train on Z-Image base, run on Turbo" recipe, here as cheap as the others.

Every checkpoint the run saves is measured on the student (adapter removed, as users run
it): blur / precision / coverage on the new concept and on the old ones (what the LoRA
broke elsewhere) at several sampler steps, and turbo_drift from the same 8-step sampling
the preview uses. The final LoRA gets the full table (1, 2, 4, 8, 30 steps). Everything
goes to `lab-result.json` in each run folder; `summarize` turns them into the TURBO.md table.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .build import EVAL_STEPS, Lab, load_lab
from .concepts import SIZE
from .measure import EVAL_SEED, averaged, measure, sample_latents

Log = Callable[[str], None]
STRATEGIES = ("direct", "merge", "live", "base")
CURVE_STEPS = (1, 2, 8)


@dataclass
class RunSettings:
    """The user's training run (the same for every strategy) and how much to measure."""

    strategies: tuple[str, ...] = STRATEGIES
    seeds: tuple[int, ...] = (1, 2, 3)
    steps: int = 240  # `zturbo lab run --help` repeats the default
    lr: float = 2e-3
    rank: int = 8
    batch_size: int = 16
    checkpoints: int = 3  # saves (and curve points) before the final LoRA
    eval_samples: int = 32
    preview_seeds: int = 4
    extra: dict = field(default_factory=dict)  # more `section.key` overrides, e.g. {"train.lr_scheduler": "cosine"}

    @classmethod
    def quick(cls) -> "RunSettings":
        return cls(strategies=("direct", "merge"), seeds=(1,), steps=80, checkpoints=1, eval_samples=8)

    @classmethod
    def from_options(
        cls, seeds: str, strategies: str, steps: int | None, lr: float | None, quick: bool
    ) -> "RunSettings":
        """`zturbo lab run`'s options (comma lists), checked before anything loads; unset steps and lr keep the
        defaults (--quick's own with --quick)."""
        from ..errors import ConfigError

        try:
            seed_list = tuple(int(x) for x in seeds.split(",") if x.strip())
        except ValueError:
            raise ConfigError(f"--seeds {seeds!r} must be comma-separated integers, e.g. 1,2,3") from None
        names = tuple(x.strip() for x in strategies.split(",") if x.strip())
        unknown = [n for n in names if n not in STRATEGIES]
        if unknown or not names or not seed_list:
            raise ConfigError(
                f"--strategies {strategies!r} / --seeds {seeds!r}: give at least one seed and strategies "
                f"from {', '.join(STRATEGIES)}" + (f" ({', '.join(unknown)} unknown)" if unknown else "")
            )
        settings = cls.quick() if quick else cls()
        settings.steps = settings.steps if steps is None else steps
        settings.lr = settings.lr if lr is None else lr
        settings.seeds, settings.strategies = seed_list, names
        return settings


def strategy_model(lab: Lab, strategy: str) -> dict:
    table = {
        "direct": {"path": str(lab.student), "adapter": "none"},
        "merge": {"path": str(lab.student), "adapter": str(lab.adapter), "adapter_mode": "merge"},
        "live": {"path": str(lab.student), "adapter": str(lab.adapter), "adapter_mode": "live"},
        "base": {"path": str(lab.teacher), "adapter": "none"},
    }
    if strategy not in table:
        from ..errors import ConfigError

        raise ConfigError(f"lab strategy {strategy!r} is not one of {', '.join(table)}")
    return {**table[strategy], "dtype": "fp32"}


def run_config(lab: Lab, strategy: str, seed: int, r: RunSettings, out: Path) -> dict:
    """The raw config (as TOML would give it) of one user run."""
    every = max(1, r.steps // (r.checkpoints + 1))
    raw = {
        "model": strategy_model(lab, strategy),
        # repeats: the new concept is two images; an epoch must hold at least one batch
        "data": {"dir": str(lab.root / "data" / "new"), "resolution": SIZE, "repeats": r.batch_size},
        "lora": {"rank": r.rank},
        "train": {
            "steps": r.steps,
            "lr": r.lr,
            "batch_size": r.batch_size,
            "seed": seed,
            "output_dir": str(out),
            "name": "lora",
            "save_every": every,
            "sample_every": every,
            "keep_last": r.checkpoints + 2,
            "log_every": 10,
            "gradient_checkpointing": "none",
            "compile": False,
            "timestep_sampling": "uniform",  # as the lab's models were trained: the decision is made at high noise
        },
        "sample": {
            "prompts": [lab.new_caption] * r.preview_seeds,
            "steps": 8,
            "width": SIZE,
            "height": SIZE,
            "seed": EVAL_SEED,
        },
    }
    for key, value in r.extra.items():
        section, _, name = key.partition(".")
        raw[section][name] = value
    return raw


def to_toml(raw: dict) -> str:
    """A config dict as TOML (strings, numbers, booleans, lists of those), to rerun a lab run by hand."""

    def value(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(str(v))

    return "".join(
        f"[{section}]\n" + "".join(f"{k} = {value(v)}\n" for k, v in table.items()) + "\n"
        for section, table in raw.items()
    )


def train_one(lab: Lab, strategy: str, seed: int, r: RunSettings, out: Path) -> Path:
    """One `zturbo train` run; its config.toml is written beside it."""
    from ..config import validate_config
    from ..fileio import write_text
    from ..train.loop import run

    raw = run_config(lab, strategy, seed, r, out)
    result = run(validate_config(raw), overwrite=True, quiet=True, device=torch.device("cpu"))
    write_text(out / "config.toml", to_toml(raw))
    return result.run_dir


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(training step, LoRA file) of every saved LoRA, the final one last."""
    files = (run_dir / "checkpoints").glob("lora-step*.safetensors")
    found = sorted((int(p.stem.rsplit("step", 1)[1]), p) for p in files)
    final_step = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    return [*found, (final_step, run_dir / "lora.safetensors")]


def drift_of(transformer, scheduler, lab: Lab, n: int) -> float:
    """turbo_drift of the new concept at 8 steps, as the preview computes it (more seeds)."""
    from ..drift import DriftProbe

    probe = DriftProbe()
    sample_latents(
        transformer,
        scheduler,
        [lab.embeds[lab.new_caption]] * n,
        [EVAL_SEED + i for i in range(n)],
        8,
        observe=probe.observe,
        chunk=n,
    )
    return probe.value()


def measure_run(lab: Lab, run_dir: Path, r: RunSettings) -> dict:
    """Curve over the run's checkpoints and the full table for its final LoRA, all on the student."""
    from ..lora.formats import read_lora_file
    from ..lora.network import load_lora
    from ..models import load_parts

    parts = load_parts(str(lab.student), ["transformer", "scheduler"], dtype="fp32", device="cpu")
    parts.transformer.requires_grad_(False)
    captions = [lab.new_caption, *lab.old_captions]
    curve = []
    saved = checkpoints(run_dir)
    for index, (step, path) in enumerate(saved):
        network = load_lora(parts.transformer, read_lora_file(path)[0], what=str(path))
        final = index == len(saved) - 1
        result = measure(
            parts.transformer,
            parts.scheduler,
            lab.embeds,
            lab.modes,
            captions,
            EVAL_STEPS if final else CURVE_STEPS,
            r.eval_samples,
        )
        point = {
            "step": step,
            "new": averaged(result, [lab.new_caption]),
            "old": averaged(result, lab.old_captions),
            "drift": drift_of(parts.transformer, parts.scheduler, lab, r.eval_samples),
        }
        network.detach()
        curve.append(point)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [
        {"step": row["step"], "turbo_drift": row["turbo_drift"], "ratio": row["turbo_drift_ratio"]}
        for row in rows
        if "turbo_drift" in row
    ]
    return {"curve": curve, "final": curve[-1], "logged_drift": logged}


def run_lab(root: Path, r: RunSettings | None = None, log: Log = print) -> dict:
    """Every strategy and seed: train, measure, write `runs/<strategy>-seed<N>/lab-result.json`; return them all.

    One file per run, so several `zturbo lab run` processes (different strategies) can share a lab.
    """
    from ..fileio import write_json

    r = r or RunSettings()
    lab = load_lab(root)
    for strategy in r.strategies:
        for seed in r.seeds:
            clock = time.perf_counter()
            run_dir = train_one(lab, strategy, seed, r, lab.root / "runs" / f"{strategy}-seed{seed}")
            trained = time.perf_counter() - clock
            measured = measure_run(lab, run_dir, r)
            measured["seconds"] = {"train": trained, "measure": time.perf_counter() - clock - trained}
            measured["settings"] = asdict(r)
            write_json(run_dir / "lab-result.json", measured)
            final = measured["final"]
            log(
                f"{strategy} seed {seed}: new blur @2 {final['new']['2']['blur']:.3f} "
                f"@8 {final['new']['8']['blur']:.3f} @30 {final['new']['30']['blur']:.3f}; "
                f"old @2 {final['old']['2']['blur']:.3f}; drift {final['drift']:.3f} ({trained:.0f}s train)"
            )
    return collect(lab.root)


def collect(root: Path) -> dict:
    """{"runs": {strategy: {seed: result}}} from every finished run of a lab."""
    runs: dict = {}
    for path in sorted(Path(root, "runs").glob("*-seed*/lab-result.json")):
        strategy, _, seed = path.parent.name.rpartition("-seed")
        runs.setdefault(strategy, {})[seed] = json.loads(path.read_text(encoding="utf-8"))
    return {"runs": runs}


def spread(values: Sequence[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def summarize(results: dict) -> dict:
    """{strategy: {"new"|"old": {steps: {metric: spread over seeds}}, "drift": spread}} of the final LoRAs."""
    out = {}
    order = sorted(results["runs"], key=lambda k: STRATEGIES.index(k) if k in STRATEGIES else len(STRATEGIES))
    for strategy in order:
        seeds = results["runs"][strategy]
        finals = [run["final"] for run in seeds.values()]
        entry = {"drift": spread([f["drift"] for f in finals])}
        for part in ("new", "old"):
            entry[part] = {
                steps: {metric: spread([f[part][steps][metric] for f in finals]) for metric in finals[0][part][steps]}
                for steps in finals[0][part]
            }
        out[strategy] = entry
    return out
