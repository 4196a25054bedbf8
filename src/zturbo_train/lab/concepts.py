"""The lab's image set: each caption (concept) is a few exact images (its modes).

A mode is a coloured shape at one position on black, 64x64 pixels, so a flow model that
has learned a concept puts every sample on one of a handful of known points in latent
space, and a metric can check that exactly (metric.py). The old concepts are what the
teacher and the Turbo student know; the new concept (a shape and colour they never saw)
is what a user's LoRA teaches.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SIZE = 64
SHAPE_SIDE = 22
POSITIONS = {
    "top-left": (16, 16),
    "top-right": (48, 16),
    "bottom-left": (16, 48),
    "bottom-right": (48, 48),
    "centre": (32, 32),
}


@dataclass(frozen=True)
class Concept:
    caption: str
    shape: str
    colour: tuple[int, int, int]
    positions: tuple[str, ...]

    @property
    def slug(self) -> str:
        return self.caption.replace(" ", "-")


OLD_CONCEPTS = (
    Concept("a red square", "square", (230, 40, 40), ("top-left", "bottom-right")),
    Concept("a blue disc", "disc", (40, 90, 230), ("top-right", "bottom-left")),
    Concept("a yellow bar", "bar", (230, 210, 40), ("top-left", "bottom-left")),
    Concept("a white cross", "cross", (235, 235, 235), ("top-right", "centre")),
)
NEW_CONCEPT = Concept("a green triangle", "triangle", (40, 200, 80), ("top-left", "top-right", "bottom-right"))


def render(shape: str, colour: tuple[int, int, int], position: str):
    """One mode as a PIL RGB image."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (SIZE, SIZE), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    cx, cy = POSITIONS[position]
    h = SHAPE_SIDE // 2
    box = (cx - h, cy - h, cx + h - 1, cy + h - 1)
    if shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "disc":
        draw.ellipse(box, fill=colour)
    elif shape == "bar":
        draw.rectangle((cx - h, cy - h // 3, cx + h - 1, cy + h // 3), fill=colour)
    elif shape == "cross":
        draw.rectangle((cx - h, cy - 3, cx + h - 1, cy + 2), fill=colour)
        draw.rectangle((cx - 3, cy - h, cx + 2, cy + h - 1), fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - h), (cx - h, cy + h - 1), (cx + h - 1, cy + h - 1)], fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return image


def images_of(concept: Concept) -> list:
    return [render(concept.shape, concept.colour, p) for p in concept.positions]


def write_dataset(concepts: tuple[Concept, ...], folder: Path) -> Path:
    """A `zturbo train` data folder: one PNG per mode with its caption in a same-stem .txt."""
    from ..fileio import write_text, write_with

    for concept in concepts:
        for position, image in zip(concept.positions, images_of(concept)):
            stem = folder / f"{concept.slug}-{position}"
            write_with(stem.with_suffix(".png"), lambda tmp, im=image: im.save(tmp, format="PNG"))
            write_text(stem.with_suffix(".txt"), concept.caption)
    return folder
