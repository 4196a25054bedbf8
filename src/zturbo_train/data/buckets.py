"""Aspect-ratio buckets: every image trains at about resolution^2 pixels in its own shape.

Buckets for a resolution R have sides that are multiples of 16 (VAE factor 8 times patch
2) and at most R^2 pixels, stepping the long side by about R/16 so each resolution has a
similar number of buckets (fewer, fuller buckets mean fewer part-filled batches). An image
goes to the bucket whose aspect ratio is closest in log space (so 2:1 and 1:2 are equally
far from 1:1), is resized so it covers the bucket and centre-cropped: at most a thin
strip is lost, never stretched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

Bucket = tuple[int, int]  # (width, height) in pixels
MAX_ASPECT = 4.0
SMALL_UPSCALE = 1.5  # upscaling an image more than this makes it soft: warn


def bucket_step(resolution: int) -> int:
    """The step of the long side between buckets: R/16 rounded down to 16, at least 16."""
    return max(16, (resolution // 16) // 16 * 16)


@lru_cache(maxsize=None)
def make_buckets(resolution: int, max_aspect: float = MAX_ASPECT) -> tuple[Bucket, ...]:
    """All buckets for one resolution, sorted by aspect ratio (tall to wide)."""
    if resolution < 16 or resolution % 16:
        raise ValueError(f"resolution {resolution} must be a positive multiple of 16")
    area, step = resolution * resolution, bucket_step(resolution)
    found: set[Bucket] = set()
    width = resolution
    while True:
        height = area // width // 16 * 16
        if height < 16 or width / height > max_aspect:
            break
        found.update({(width, height), (height, width)})
        width += step
    return tuple(sorted(found, key=lambda b: (b[0] / b[1], b[0])))


def closest_bucket(width: int, height: int, resolution: int) -> Bucket:
    """The bucket of `resolution` whose aspect ratio is nearest (in log ratio) to the image's."""
    target = math.log(width / height)
    return min(make_buckets(resolution), key=lambda b: (abs(math.log(b[0] / b[1]) - target), b[0]))


@dataclass(frozen=True)
class Fit:
    """How an image of one size fits a bucket: resized size, crop box and upscale factor."""

    bucket: Bucket
    resized: tuple[int, int]
    crop: tuple[int, int, int, int]  # left, top, right, bottom in the resized image
    scale: float

    @property
    def upscaled_much(self) -> bool:
        return self.scale > SMALL_UPSCALE

    @property
    def cropped(self) -> float:
        """The share of the picture the centre crop cuts off (0 when it fits the bucket's shape)."""
        return 1.0 - (self.bucket[0] * self.bucket[1]) / (self.resized[0] * self.resized[1])


def fit(width: int, height: int, bucket: Bucket) -> Fit:
    """Resize so the image covers the bucket (one side exact), then centre-crop the other side."""
    bw, bh = bucket
    scale = max(bw / width, bh / height)
    rw, rh = max(bw, round(width * scale)), max(bh, round(height * scale))
    left, top = (rw - bw) // 2, (rh - bh) // 2
    return Fit(bucket, (rw, rh), (left, top, left + bw, top + bh), scale)


def resize_crop(image, bucket: Bucket):
    """A PIL RGB image resized (Lanczos) and centre-cropped to exactly the bucket's size."""
    from PIL import Image

    plan = fit(image.width, image.height, bucket)
    if image.size != plan.resized:
        image = image.resize(plan.resized, Image.Resampling.LANCZOS)
    return image.crop(plan.crop)
