"""loss.png and the per-prompt preview timelines, drawn from what the run folder holds.

matplotlib (a core dependency: every run writes loss.png and report.html, and it is a
plain wheel on every platform) draws on its Agg canvas with no pyplot state, so it is
safe on the monitor's background thread. Timelines are image strips and need only Pillow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..fileio import write_with
from .records import LOSS_LABEL, Preview

FRAME_HEIGHT = 256  # timeline frames are scaled down to this height (never up)
LABEL_HEIGHT = 20
GAP = 4


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [float(p[1]) for p in points]


def drift_series(rows: list[dict[str, Any]]) -> tuple[list[int], list[float]]:
    """turbo_drift per preview step, starting at step 0's preview (logged as turbo_drift_start: step 0 has no row)."""
    steps, values = _series(rows, "turbo_drift")
    start = next((r["turbo_drift_start"] for r in rows if isinstance(r.get("turbo_drift_start"), (int, float))), None)
    if steps and start is not None and steps[0] > 0:
        return [0, *steps], [float(start), *values]
    return steps, values


def plot_loss(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """loss.png: `loss_figure` of the rows, written atomically (None without rows)."""
    if not rows:
        return None
    fig = loss_figure(rows)
    return write_with(path, lambda tmp: fig.savefig(tmp, format="png"))


def loss_figure(rows: list[dict[str, Any]]):
    """Raw and smoothed loss (and val_loss) with lr on a second axis; grad norm (and turbo_drift) below; DOP's
    dop_loss on a third panel when the run has it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dop = _series(rows, "dop_loss")  # on a panel of its own: it starts at 0, far below the training loss
    panels = 3 if dop[0] else 2
    fig = Figure(figsize=(10, 5.2 + 1.6 * (panels - 2)), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom, *extra = fig.subplots(panels, 1, sharex=True, height_ratios=[2, 1, 1][:panels])
    top.plot(*_series(rows, "loss"), color="#9db4d9", linewidth=0.8, label="loss")
    top.plot(*_series(rows, "loss_smooth"), color="#1f4e9c", linewidth=1.8, label=LOSS_LABEL)
    val = _series(rows, "val_loss")
    if val[0]:
        top.plot(*val, color="#d1495b", marker="o", linewidth=1.5, label="validation loss")
    top.set_ylabel("loss")
    lr = top.twinx()
    steps, rates = _series(rows, "lr")
    lr.plot(steps, rates, color="#6a994e", linestyle="--", linewidth=1.2, label="lr")
    lr.set_ylim(0, max(rates, default=1.0) * 1.15 or 1.0)  # from zero, so a constant lr reads as constant
    lr.set_ylabel("learning rate")
    lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    _legend(top, lr)
    bottom.plot(*_series(rows, "grad_norm"), color="#7b2cbf", linewidth=1.0, label="grad norm")
    bottom.set_ylabel("grad norm")
    drift = drift_series(rows)
    if drift[0]:
        twin = bottom.twinx()
        twin.plot(*drift, color="#e07a5f", marker=".", linewidth=1.2, label="turbo drift")
        twin.set_ylabel("turbo drift")
        _legend(bottom, twin)
    else:
        _legend(bottom, None)
    for axis in extra:
        axis.plot(*dop, color="#f4a261", linewidth=1.0, label="preservation loss (DOP)")
        axis.set_ylabel("DOP loss")
        _legend(axis, None)
    (extra or [bottom])[-1].set_xlabel("step")
    for axis in (top, bottom, *extra):
        axis.grid(alpha=0.3)
    return fig


def _legend(axis, twin) -> None:
    lines = axis.get_lines() + (twin.get_lines() if twin is not None else [])
    axis.legend(
        lines,
        [line.get_label() for line in lines],
        loc="lower left",
        bbox_to_anchor=(0, 1),
        ncol=len(lines),
        fontsize="small",
        frameon=False,
    )  # above the axes, clear of the curves


def timelines(steps: list[Preview], folder: Path) -> list[Path]:
    """samples/timeline-<n>.png: prompt n's previews across the steps in one strip, the step under each."""
    count = max((len(p.images) for p in steps), default=0)
    return [
        path
        for n in range(count)
        if (path := timeline([(p.step, p.images[n]) for p in steps if n < len(p.images)], folder / f"timeline-{n}.png"))
        is not None
    ]


def timeline(frames: list[tuple[int, Path]], path: Path) -> Path | None:
    from PIL import Image, ImageDraw, ImageFont

    images = []
    for step, image_path in frames:
        with Image.open(image_path) as image:
            image = image.convert("RGB")
        image.thumbnail((FRAME_HEIGHT * 4, FRAME_HEIGHT))
        images.append((step, image))
    if not images:
        return None
    height = max(im.height for _, im in images)
    strip = Image.new(
        "RGB", (sum(im.width for _, im in images) + GAP * (len(images) + 1), height + LABEL_HEIGHT + GAP), "white"
    )
    draw, font = ImageDraw.Draw(strip), ImageFont.load_default(size=12)
    x = GAP
    for step, image in images:
        strip.paste(image, (x, GAP))
        label = f"step {step}"
        width = draw.textlength(label, font=font)
        draw.text((x + (image.width - width) / 2, height + GAP + 3), label, fill="black", font=font)
        x += image.width + GAP
    return write_with(path, lambda tmp: strip.save(tmp, format="PNG"))
