"""`zturbo lab report`: the TURBO.md table (mean and min-max over seeds) and the curves as PNGs."""

from __future__ import annotations

from pathlib import Path

from .experiment import STRATEGIES, collect, summarize

STEPS = ("1", "2", "4", "8", "30")
LABELS = {
    "direct": "directly on the student",
    "merge": "over the adapter (merge)",
    "live": "over the adapter (live)",
    "base": "on the teacher (base), used on the student",
}
COLOURS = {"direct": "tab:orange", "merge": "tab:red", "live": "tab:green", "base": "tab:blue"}  # same in every plot


def _cell(spread: dict[str, float]) -> str:
    return f"{spread['mean']:.3f} ({spread['min']:.3f}-{spread['max']:.3f})"


def table(summary: dict, part: str, metric: str) -> str:
    """One markdown table: a row per strategy, a column per sampler step count."""
    lines = [
        f"| user LoRA trained ({part} concept{'s' if part == 'old' else ''}, {metric}) | "
        + " | ".join(f"{s} step{'s' if s != '1' else ''}" for s in STEPS)
        + " |",
        "| --- |" + " --- |" * len(STEPS),
    ]
    for strategy, entry in summary.items():
        lines.append(
            f"| {LABELS.get(strategy, strategy)} | " + " | ".join(_cell(entry[part][s][metric]) for s in STEPS) + " |"
        )
    return "\n".join(lines)


def drift_table(summary: dict) -> str:
    lines = ["| user LoRA trained | turbo_drift at the end (8 steps, new concept) |", "| --- | --- |"]
    lines += [f"| {LABELS.get(k, k)} | {_cell(v['drift'])} |" for k, v in summary.items()]
    return "\n".join(lines)


MODEL_ROWS = {
    "ideal": "perfect teacher (the exact field, `lab/ideal.py`)",
    "teacher": "teacher",
    "student": "Turbo student",
    "student_adapter": "student + adapter",
    "teacher_new_concept": "teacher, new concept (never trained)",
    "student_new_concept": "student, new concept (never trained)",
}


def models_table(info: dict) -> str:
    """The built models on the old concepts (blur / precision / off), from lab.json's "quality"."""
    quality = info["quality"]
    lines = [
        "| model (blur / precision / off) | " + " | ".join(f"{s} step{'s' if s != '1' else ''}" for s in STEPS) + " |",
        "| --- |" + " --- |" * len(STEPS),
    ]
    for key, label in MODEL_ROWS.items():
        row = quality[key]
        cells = [f"{row[s]['blur']:.3f} / {row[s]['precision']:.2f} / {row[s].get('off', 0.0):.2f}" for s in STEPS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    drift = ", ".join(
        f"{k} {quality[f'{k}_drift']['old']:.3f} (new concept {quality[f'{k}_drift']['new']:.3f})"
        for k in ("teacher", "student", "student_adapter")
    )
    return "\n".join(lines) + f"\n\nturbo_drift (8 steps, old concepts): {drift}"


def report(lab_dir: Path, plots: Path | None = None) -> str:
    from ..errors import DataError
    from .build import load_lab

    results = collect(Path(lab_dir))
    if not results["runs"]:
        raise DataError(f"{lab_dir} has no measured runs; run `zturbo lab run {lab_dir}` first")
    summary = summarize(results)
    parts = [models_table(load_lab(Path(lab_dir)).info)]
    parts += [table(summary, "new", m) for m in ("blur", "precision", "coverage", "off")]
    parts += [table(summary, "old", m) for m in ("blur", "precision")]
    parts.append(drift_table(summary))
    if plots is not None:
        written = plot_curves(results, Path(plots))
        parts.append("plots: " + ", ".join(str(p) for p in written))
    return "\n\n".join(parts)


def _curve(results: dict, strategy: str, key) -> tuple[list[int], list[float], list[float], list[float]]:
    """Steps and mean/min/max over seeds of key(point) along the checkpoints."""
    runs = list(results["runs"][strategy].values())
    steps = [p["step"] for p in runs[0]["curve"]]
    values = [[key(run["curve"][i]) for run in runs] for i in range(len(steps))]
    return steps, [sum(v) / len(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def plot_curves(results: dict, out: Path) -> list[Path]:
    """turbo-curves.png (new concept blur at 1, 2 and 8 steps; old concepts at 2; drift) and per-step PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    panels = [
        ("new concept blur, 1 step", lambda p: p["new"]["1"]["blur"]),
        ("new concept blur, 2 steps", lambda p: p["new"]["2"]["blur"]),
        ("new concept blur, 8 steps", lambda p: p["new"]["8"]["blur"]),
        ("old concepts blur, 2 steps (damage)", lambda p: p["old"]["2"]["blur"]),
        ("turbo_drift (8 steps, new concept)", lambda p: p["drift"]),
        ("new concept precision, 2 steps", lambda p: p["new"]["2"]["precision"]),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (title, key) in zip(axes.flat, panels):
        for strategy in sorted(results["runs"], key=lambda k: STRATEGIES.index(k) if k in STRATEGIES else 99):
            steps, mean, low, high = _curve(results, strategy, key)
            (line,) = ax.plot(
                steps, mean, marker="o", label=LABELS.get(strategy, strategy), color=COLOURS.get(strategy)
            )
            ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("Lab: user LoRA on a new concept, sampled on the Turbo student (mean, band = min-max over seeds)")
    fig.tight_layout()
    path = out / "turbo-curves.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return [path]
