"""Make the bundled example dataset: small pictures of one subject with captions.

Run once; the output is committed under examples/data. Every picture shows the same
"sks" subject (a red square with a yellow dot on a blue ground) at other places and
sizes, so a LoRA has one clear thing to learn.
"""

import random
from pathlib import Path

from PIL import Image, ImageDraw

OUT = Path(__file__).resolve().parent.parent / "examples" / "data"
SIZES = [(96, 96), (96, 96), (128, 96), (96, 128), (96, 96), (112, 112)]


def draw(index: int, size: tuple[int, int], rng: random.Random) -> Image.Image:
    img = Image.new("RGB", size, (40, 60, 170))
    pen = ImageDraw.Draw(img)
    side = rng.randint(min(size) // 3, min(size) // 2)
    x, y = rng.randint(4, size[0] - side - 4), rng.randint(4, size[1] - side - 4)
    pen.rectangle([x, y, x + side, y + side], fill=(210, 40, 40))
    r = side // 6
    cx, cy = x + side // 2, y + side // 2
    pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(240, 220, 40))
    return img


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    rng = random.Random(7)
    places = ["on a blue floor", "in the middle", "near the corner", "on blue ground", "centered", "alone"]
    for i, size in enumerate(SIZES):
        draw(i, size, rng).save(OUT / f"img_{i:02d}.png")
        caption = f"[trigger] a red square with a yellow dot {places[i]}\n"
        (OUT / f"img_{i:02d}.txt").write_text(caption, encoding="utf-8")


if __name__ == "__main__":
    main()
