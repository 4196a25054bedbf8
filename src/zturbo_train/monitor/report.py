"""report.html: one static page per run folder that opens offline.

Everything the page shows comes from the run folder (run.toml or config.json, metrics.jsonl,
samples/, the LoRA files), so `zturbo report RUN_DIR` (commands/report.py) works on a finished
run, a stopped one and one still training. CSS is inline, thumbnails and the loss plot are embedded as
small data URIs; the loss plot and the links (click to enlarge, the files) are relative
to the run folder.
"""

from __future__ import annotations

import base64
import html
import io
import json
import statistics
import time
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from ..config import DEFAULT_REG_RATIO
from ..fileio import write_text
from .next_commands import RUN_TOML, commands
from .records import HISTORY, LAST_LOSS_LABEL, LOSS_LABEL, Preview, previews, read_history, read_metrics

REPORT = "report.html"
THUMB = 192  # px, longest side of an embedded preview (shown at 144 px, sharp on high-density screens)
Phase = Literal["running", "ended"]

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
main{max-width:1180px;margin:0 auto;padding:18px 24px}
h1{font-size:22px;margin:0 0 2px}h2{font-size:16px;margin:22px 0 8px;border-bottom:1px solid #d8dce3}
.status{display:inline-block;padding:2px 8px;border-radius:10px;font-size:12px;background:#e2e8f0}
.finished{background:#d3f0dc}.running{background:#dbe8fb}.stopped{background:#fbe3cf}
.grid2{display:grid;grid-template-columns:1fr 1fr;gap:10px 24px}
table{border-collapse:collapse}td,th{padding:3px 10px 3px 0;text-align:left;vertical-align:top}
th{color:#5a6375;font-weight:600}.kv th{width:130px}
.previews td{padding:3px}.previews img{display:block;width:144px;height:auto;border-radius:3px}
.previews .prompt{max-width:220px;font-size:13px}.muted{color:#6b7385}
pre{background:#1d2330;color:#e8ecf3;padding:8px 10px;border-radius:4px;white-space:pre-wrap;
overflow-wrap:anywhere;margin:4px 0 10px}
img.plot{width:100%;max-width:860px;background:#fff;border:1px solid #d8dce3}
"""


def load_config(root: Path) -> dict[str, Any]:
    """run.toml (the resolved config of the run's latest session) or, for older runs, config.json."""
    from ..config import tomllib

    for path, parse in ((root / RUN_TOML, tomllib.loads), (root / "config.json", json.loads)):
        try:
            return parse(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
    return {}


def write_report(root: Path, status: str | None = None, phase: Phase = "ended") -> Path:
    """Write <root>/report.html atomically; `status` is an ending the files cannot tell (an error)."""
    root = Path(root)
    return write_text(root / REPORT, render(root, status, phase))


def render(root: Path, status: str | None, phase: Phase) -> str:
    config, rows = load_config(root), read_metrics(root / "metrics.jsonl")
    train = config.get("train", {})
    label, css = _status(root, config, rows, status, phase)
    name = train.get("name", root.name)
    body = [
        f"<h1>{_e(name)}</h1>",
        f'<div><span class="status {css}">{_e(label)}</span> <span class="muted">{_e(str(root))} · '
        f"report written {time.strftime('%Y-%m-%d %H:%M:%S')}</span></div>",
        '<div class="grid2">',
        _settings(root, config),
        _progress(config, rows, phase),
        "</div>",
        "<h2>Loss</h2>",
        _plot(root),
        "<h2>Previews</h2>",
        _previews(root, previews(root / "samples"), config),
        "<h2>Files</h2>",
        _files(root, name),
        "<h2>Commands</h2>",
        _commands(root, config),
    ]
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(name)} · zturbo report</title>'
        f'<meta name="viewport" content="width=device-width,initial-scale=1"><style>{CSS}</style></head>\n'
        f"<body><main>\n" + "\n".join(body) + "\n</main></body></html>\n"
    )


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _href(root: Path, path: Path) -> str:
    return quote(path.relative_to(root).as_posix())


def _status(root: Path, config: dict, rows: list[dict], status: str | None, phase: Phase) -> tuple[str, str]:
    total = config.get("train", {}).get("steps")
    step = rows[-1]["step"] if rows else 0
    where = f"step {step} of {total}"
    if phase == "running":
        return f"training: {where}", "running"
    if status:
        return f"{status} ({where})", "stopped"
    final = root / f"{config.get('train', {}).get('name', 'lora')}.safetensors"
    if final.is_file() and total is not None and step >= total:
        return f"finished: {step} steps", "finished"
    return f"stopped at {where}", "stopped"


def _table(pairs: list[tuple[str, Any]]) -> str:
    return '<table class="kv">' + "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in pairs) + "</table>"


def _settings(root: Path, config: dict) -> str:
    model, lora, train = config.get("model", {}), config.get("lora", {}), config.get("train", {})
    pairs = [
        ("base model", model.get("path", "?")),
        (
            "adapter",
            f"{model.get('adapter', '?')} ({model.get('adapter_mode', '?')}, weight "
            f"{model.get('adapter_weight', '?')}), base in {model.get('dtype', '?')}",
        ),
        (
            "LoRA",
            f"{_network(lora)}rank {lora.get('rank', '?')}, alpha {lora.get('alpha') or lora.get('rank', '?')}, "
            f"dropout {lora.get('dropout', 0)}",
        ),
        ("targets", f"{', '.join(lora.get('targets', []))} in {', '.join(lora.get('blocks', []))}"),
        (
            "training",
            f"{train.get('steps', '?')} steps, batch {train.get('batch_size', '?')} x accum "
            f"{train.get('grad_accum', '?')}, lr {train.get('lr', '?')} {train.get('lr_scheduler', '')} "
            f"(warm-up {train.get('warmup_steps', 0)}), {train.get('optimizer', '?')}, "
            f"seed {train.get('seed', '?')}, memory {train.get('memory', '?')}",
        ),
    ]
    for n, data in enumerate(config.get("data", [])):
        pairs.append((f"data {n}" if len(config.get("data", [])) > 1 else "data", _data_line(data)))
    for row in read_history(root):  # the settings above are the latest session's; what each resume changed
        pairs.append(
            (
                f"changed at step {row['step']}",
                ", ".join(
                    f"{key} {_setting(change.get('from'))} -> {_setting(change.get('to'))}"
                    for key, change in row["changes"].items()
                    if isinstance(change, dict)
                ),
            )
        )
    return "<div><h2>Run</h2>" + _table(pairs) + "</div>"


def _setting(value: Any) -> str:
    """A setting's value as `--resume` prints its changes (train/resume.py)."""
    return "(unset)" if value is None else json.dumps(value)


def _data_line(data: dict) -> str:
    from ..data.dataset import IMAGE_EXTS

    folder = Path(str(data.get("dir", "")))
    count = sum(1 for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS) if folder.is_dir() else None
    images = f"{count} images" if count is not None else "folder not found"
    trigger = f", trigger {data['trigger_word']!r}" if data.get("trigger_word") else ""
    sizes = ", ".join(str(side) for side in data.get("resolution", [])) or "?"
    share = (
        f"regularisation set (ratio {data.get('ratio') or DEFAULT_REG_RATIO:g} of each epoch)"
        if data.get("regularisation")
        else f"repeats {data.get('repeats', 1)}"
    )
    weight = f", loss weight {data['loss_weight']:g}" if data.get("loss_weight", 1.0) != 1.0 else ""
    return (
        f"{folder} ({images}) at {sizes} px, {share}{weight}"
        f"{', flipped too' if data.get('flip') else ''}{trigger}, caption dropout {data.get('caption_dropout', 0)}"
    )


def _progress(config: dict, rows: list[dict], phase: Phase) -> str:
    train = config.get("train", {})
    if not rows:
        return '<div><h2>Time and speed</h2><p class="muted">no metrics yet</p></div>'
    last, total = rows[-1], int(train.get("steps", rows[-1]["step"]))
    seconds = [r["sec_per_step"] for r in rows if isinstance(r.get("sec_per_step"), (int, float))]
    per_step = statistics.median(seconds) if seconds else None
    samples = int(train.get("batch_size", 1)) * int(train.get("grad_accum", 1))
    pairs: list[tuple[str, Any]] = [
        ("steps", f"{last['step']} of {total}"),
        (LOSS_LABEL, _number(last.get("loss_smooth"))),
        (LAST_LOSS_LABEL, _number(last.get("loss"))),
    ]
    if seconds and per_step:
        pairs += [
            ("training time", _duration(sum(seconds))),
            ("speed", f"{per_step:.3g} s/step (median), {samples / per_step:.3g} images/s per GPU"),
        ]
        if phase != "ended" and last["step"] < total:
            pairs.append(("left", f"about {_duration((total - last['step']) * per_step)}"))
    peaks = [r["peak_mem_gib"] for r in rows if isinstance(r.get("peak_mem_gib"), (int, float))]
    pairs.append(("peak memory", f"{max(peaks):.2f} GiB" if peaks else "not measured (CPU)"))
    for key in ("val_loss", "turbo_drift"):
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        if values:
            pairs.append((key.replace("_", " "), f"{values[-1]:.4g} (last)"))
    return "<div><h2>Time and speed</h2>" + _table(pairs) + "</div>"


def _number(value: Any) -> str:
    """A loss as the end-of-run summary prints it ('-' when the row has none)."""
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s" if minutes else f"{seconds:.1f} s"


def _data_uri(path: Path, size: int) -> str:
    """A thumbnail (longest side `size`, never enlarged) as a data URI: PNG when small, JPEG otherwise."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
    image.thumbnail((size, size))
    buffer, kind = io.BytesIO(), "png" if image.width * image.height <= 96 * 96 else "jpeg"
    image.save(buffer, format=kind.upper(), **({"quality": 85} if kind == "jpeg" else {}))
    return f"data:image/{kind};base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _plot(root: Path) -> str:
    path = root / "loss.png"
    if not path.is_file():
        return '<p class="muted">no loss plot yet (it is drawn at every save and at the end)</p>'
    return f'<a href="{_href(root, path)}"><img class="plot" alt="loss" src="{_href(root, path)}"></a>'


def _previews(root: Path, steps: list[Preview], config: dict) -> str:
    if not steps:
        return '<p class="muted">no previews yet</p>'
    prompts = config.get("sample", {}).get("prompts", [])
    count = max(len(p.images) for p in steps)
    head = "<tr><th>prompt</th>" + "".join(f"<th>step {p.step}</th>" for p in steps) + "</tr>"
    lines = []
    for n in range(count):
        timeline = root / "samples" / f"timeline-{n}.png"
        text = _e(prompts[n] if n < len(prompts) else f"prompt {n}")
        if timeline.is_file():
            text += f'<br><a class="muted" href="{_href(root, timeline)}">timeline</a>'
        cells = "".join(
            f'<td><a href="{_href(root, p.images[n])}"><img alt="step {p.step}" '
            f'src="{_data_uri(p.images[n], THUMB)}"></a></td>'
            if n < len(p.images)
            else "<td></td>"
            for p in steps
        )
        lines.append(f'<tr><td class="prompt">{text}</td>{cells}</tr>')
    sample = config.get("sample", {})
    note = (
        f'<p class="muted">{sample.get("steps", "?")} sampling steps, guidance {sample.get("guidance", "?")}, '
        f"seed {sample.get('seed', '?')} + prompt number, with the training adapter removed; click to enlarge</p>"
    )
    return note + '<div style="overflow-x:auto"><table class="previews">' + head + "".join(lines) + "</table></div>"


def _size(path: Path) -> str:
    size = float(path.stat().st_size)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return ""


def _files(root: Path, name: str) -> str:
    files = [
        root / f"{name}.safetensors",
        *sorted((root / "checkpoints").glob("*.safetensors")),
        *sorted(p / "state.safetensors" for p in (root / "state").glob("step-*")),
        root / "loss.png",
        root / "metrics.jsonl",
        root / RUN_TOML,
        root / "config.json",
        root / HISTORY,
    ]  # not the run lock (.zturbo-train.lock): no file of the run
    rows = [
        f'<tr><td><a href="{_href(root, p)}">{_e(p.relative_to(root).as_posix())}</a></td><td>{_size(p)}</td></tr>'
        for p in files
        if p.is_file()
    ]
    return "<table>" + "".join(rows) + "</table>" if rows else '<p class="muted">no files yet</p>'


def _commands(root: Path, config: dict) -> str:
    return "".join(f"<div>{_e(what)}</div><pre>{_e(line)}</pre>" for what, line in commands(root, config).items())


def _network(lora: dict[str, Any]) -> str:
    """`LoKr (factor 4), ` before the rank for a LyCORIS network; nothing for a plain LoRA (or an older run)."""
    from ..lora.factored import network_label

    return "" if lora.get("type", "lora") == "lora" else f"{network_label(lora)}, "
