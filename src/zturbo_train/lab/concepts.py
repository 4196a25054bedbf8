"""The lab's image set: each caption (concept) is a few exact images (its modes).

Every image is a black square with one coloured tile in its top-left corner, the size of one
transformer token (16 pixels: the VAE's 8x times the 2x2 patch); the tile's colour is the mode.
The colours lie on a plane through mid-grey (a red-green and a yellow-blue axis), placed like
the issue's 2-D prototype: the old concepts' modes in pairs on a circle, the new concept's two
modes either side of its centre. Why this shape (TURBO.md, "Why this lab"): distillation removes
the few-step blur of a flow that cannot yet tell close modes apart, so the modes must be a few
noise units apart (the VAE fit sets that scale, `PLANE_RADIUS`); and a tiny transformer learns
that decision precisely only when it sits in one token, where a per-token computation makes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

SIZE = 32  # pixels: 2x2 tokens, so the decision between modes is a quarter of the loss, not 1/16
TILE = 16  # one token: 8x VAE downsampling times the transformer's 2x2 patches
GREY = 128.0
AXES = ((1 / math.sqrt(2), -1 / math.sqrt(2), 0.0), (1 / math.sqrt(6), 1 / math.sqrt(6), -2 / math.sqrt(6)))
COLOUR_RADIUS = 60.0  # the old modes' distance from grey, in 0-255 colour units
PAIR_ANGLE = 0.8  # radians between an old concept's two modes
NEW_HALF = 0.4  # the new concept's modes: +-NEW_HALF * COLOUR_RADIUS along the yellow-blue axis
PLANE_RADIUS = 4.0  # the old modes' distance from the grey tile's latent, in noise units (set by the VAE fit)


@dataclass(frozen=True)
class Concept:
    caption: str
    points: tuple[tuple[float, float], ...]  # the modes, as coordinates on the colour plane

    @property
    def slug(self) -> str:
        return self.caption.replace(" ", "-")

    @property
    def colours(self) -> list[tuple[int, int, int]]:
        return [colour_at(p) for p in self.points]


def colour_at(point: tuple[float, float]) -> tuple[int, int, int]:
    """The RGB colour at plane coordinates `point` (multiples of COLOUR_RADIUS), rounded to bytes."""
    rgb = [GREY + COLOUR_RADIUS * (point[0] * a + point[1] * b) for a, b in zip(*AXES)]
    return tuple(int(round(min(255.0, max(0.0, c)))) for c in rgb)  # type: ignore[return-value]


def _pair(angle: float) -> tuple[tuple[float, float], ...]:
    return tuple((math.cos(angle + o), math.sin(angle + o)) for o in (0.0, PAIR_ANGLE))


OLD_CONCEPTS = (
    Concept("a pink tile", _pair(0.0)),
    Concept("a yellow tile", _pair(math.pi / 2)),
    Concept("a green tile", _pair(math.pi)),
    Concept("a blue tile", _pair(3 * math.pi / 2)),
)
NEW_CONCEPT = Concept("a grey tile", ((0.0, NEW_HALF), (0.0, -NEW_HALF)))
CENTRE = Concept("mid grey", ((0.0, 0.0),))  # the plane's centre: the VAE fit scales latents around it


def render(colour: tuple[int, int, int]):
    """One mode as a PIL RGB image: black, the tile in the top-left token."""
    from PIL import Image

    image = Image.new("RGB", (SIZE, SIZE), (0, 0, 0))
    image.paste(colour, (0, 0, TILE, TILE))
    return image


def images_of(concept: Concept) -> list:
    return [render(c) for c in concept.colours]


def palette(count: int, seed: int) -> list[tuple[float, float]]:
    """Random points over the plane's disc (radius 1.2), so the VAE fit sees the whole plane."""
    import random

    rng = random.Random(seed)
    points: list[tuple[float, float]] = []
    while len(points) < count:
        x, y = rng.uniform(-1.2, 1.2), rng.uniform(-1.2, 1.2)
        if x * x + y * y <= 1.44:
            points.append((x, y))
    return points


def write_dataset(concepts: tuple[Concept, ...], folder: Path) -> Path:
    """A `zturbo train` data folder: one PNG per mode with its caption in a same-stem .txt."""
    from ..fileio import write_text, write_with

    for concept in concepts:
        for index, image in enumerate(images_of(concept)):
            stem = folder / f"{concept.slug}-{index + 1}"
            write_with(stem.with_suffix(".png"), lambda tmp, im=image: im.save(tmp, format="PNG"))
            write_text(stem.with_suffix(".txt"), concept.caption)
    return folder
