"""PNG files: numbered names that never overwrite, settings in the metadata, comparison grids."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from .fileio import atomic_path

if TYPE_CHECKING:  # pragma: no cover
    from PIL.Image import Image

NAME_PATTERN = re.compile(r"^(\d{5,})-")


def png_text(info: dict[str, object]) -> dict[str, str]:
    """PNG text chunks: `zturbo` (JSON of every setting) and `parameters` (the line other tools show)."""
    loras = ", ".join(f"{l['name']}:{l['strength']:g} ({str(l['sha256'])[:12]})" for l in info.get("loras", []))
    line = (
        f"{info['prompt']}\nNegative prompt: {info.get('negative', '')}\nSteps: {info['steps']}, "
        f"Sampler: flow-match Euler, CFG scale: {info['guidance']}, Seed: {info['seed']}, "
        f"Size: {info['width']}x{info['height']}, Model: {info['model']}" + (f", LoRAs: {loras}" if loras else "")
    )
    return {"parameters": line, "zturbo": json.dumps(info, sort_keys=True)}


def next_index(out_dir: Path) -> int:
    """1 + the highest `NNNNN-` number in the folder, so new images sort after earlier ones."""
    numbers = [int(m.group(1)) for p in out_dir.iterdir() if (m := NAME_PATTERN.match(p.name))]
    return max(numbers, default=0) + 1


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-") or "image"


def save_png(image: "Image", out_dir: Path, label: str, text: dict[str, str] | None = None) -> Path:
    """Write `NNNNN-label.png` atomically and never over an existing file (a hard link claims the name)."""
    from PIL.PngImagePlugin import PngInfo

    out_dir.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    holder = Path(tempfile.mkdtemp(prefix=".png-", dir=out_dir))
    try:
        with atomic_path(holder / "image.png") as tmp:
            image.save(tmp, format="PNG", pnginfo=info)
        return _claim_name(holder / "image.png", out_dir, _slug(label))
    finally:
        for leftover in holder.iterdir():
            leftover.unlink()
        holder.rmdir()


def _claim_name(source: Path, out_dir: Path, stem: str) -> Path:
    """Link `source` to the next free `NNNNN-stem.png`; an existing name (another process) moves on to the next."""
    while True:
        target = out_dir / f"{next_index(out_dir):05d}-{stem}.png"
        try:
            os.link(source, target)
            return target
        except FileExistsError:
            continue
        except OSError:  # no hard links on this file system: check, then rename
            if target.exists():
                continue
            os.replace(source, target)
            return target


def make_grid(rows: Sequence[Sequence["Image"]], labels: Sequence[str]) -> "Image":
    """Rows of equal-size images, each row with a text label above it (for `--compare`)."""
    from PIL import Image as PILImage
    from PIL import ImageDraw

    width, height = rows[0][0].size
    band = 14
    columns = max(len(r) for r in rows)
    grid = PILImage.new("RGB", (columns * width, len(rows) * (height + band)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (row, label) in enumerate(zip(rows, labels)):
        top = r * (height + band)
        draw.text((2, top + 1), label[: max(8, columns * width // 6)], fill="black")
        for c, image in enumerate(row):
            grid.paste(image, (c * width, top + band))
    return grid
