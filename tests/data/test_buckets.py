"""Aspect buckets: shapes, areas, closest-aspect choice and the resize + centre crop."""

import math

import pytest
from PIL import Image

from zturbo_train.data.buckets import bucket_step, closest_bucket, fit, make_buckets, resize_crop

RESOLUTIONS = [64, 96, 256, 512, 768, 1024, 1536]


@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_buckets_are_multiples_of_16_near_the_area(resolution):
    buckets = make_buckets(resolution)
    area = resolution * resolution
    assert (resolution, resolution) in buckets
    for w, h in buckets:
        assert w % 16 == 0 and h % 16 == 0 and w >= 16 and h >= 16
        assert w * h <= area, (w, h)
        # rounding one side down to 16 loses at most 16 px of it: area stays close to R^2
        assert w * h > area - 16 * max(w, h), (w, h)
        assert max(w / h, h / w) <= 4.0
    assert set(buckets) == {(h, w) for w, h in buckets}  # portrait and landscape mirror each other
    assert len(buckets) == len(set(buckets))


def test_bucket_count_is_similar_across_resolutions():
    counts = [len(make_buckets(r)) for r in (256, 512, 1024, 1536)]
    assert max(counts) - min(counts) <= 4, counts
    assert bucket_step(1024) == 64 and bucket_step(512) == 32 and bucket_step(64) == 16


def test_bad_resolution_is_refused():
    with pytest.raises(ValueError, match="multiple of 16"):
        make_buckets(100)


SIZES = [
    (1024, 1024),
    (1920, 1080),
    (1080, 1920),
    (4000, 3000),
    (3000, 4000),
    (800, 600),
    (600, 800),
    (5000, 1000),
    (1000, 5000),
    (100, 3000),
    (64, 64),
    (97, 131),
    (2048, 2047),
    (1234, 567),
    (333, 777),
]


@pytest.mark.parametrize("resolution", [512, 1024])
@pytest.mark.parametrize("size", SIZES)
def test_closest_bucket_has_the_nearest_aspect(size, resolution):
    width, height = size
    bucket = closest_bucket(width, height, resolution)
    target = math.log(width / height)
    best = min(abs(math.log(w / h) - target) for w, h in make_buckets(resolution))
    assert abs(math.log(bucket[0] / bucket[1]) - target) == best
    assert bucket in make_buckets(resolution)


def test_known_assignments():
    assert closest_bucket(1024, 1024, 1024) == (1024, 1024)
    assert closest_bucket(500, 500, 1024) == (1024, 1024)
    w, h = closest_bucket(1920, 1080, 1024)
    assert w > h and abs(w / h - 16 / 9) < 0.1
    assert closest_bucket(1080, 1920, 1024) == (h, w)
    assert closest_bucket(10000, 100, 512) == max(make_buckets(512), key=lambda b: b[0] / b[1])


@pytest.mark.parametrize("size", SIZES)
def test_fit_covers_the_bucket_and_crops_centrally(size):
    bucket = closest_bucket(*size, 512)
    plan = fit(*size, bucket)
    rw, rh = plan.resized
    assert rw >= bucket[0] and rh >= bucket[1]
    assert rw == bucket[0] or rh == bucket[1]  # one side exact: only the other side is cropped
    left, top, right, bottom = plan.crop
    assert (right - left, bottom - top) == bucket
    assert abs(left - (rw - right)) <= 1 and abs(top - (rh - bottom)) <= 1


def test_resize_crop_gives_the_bucket_and_keeps_the_centre():
    image = Image.new("RGB", (300, 100), (0, 0, 255))
    image.paste((255, 0, 0), (140, 0, 160, 100))  # a red stripe in the middle
    out = resize_crop(image, (128, 64))
    assert out.size == (128, 64)
    r, g, b = out.getpixel((64, 32))
    assert r > 200 and b < 60
    assert out.getpixel((2, 32))[2] > 200  # the sides are still blue: a crop, not a stretch


def test_small_image_is_flagged_as_upscaled():
    assert fit(300, 300, (1024, 1024)).upscaled_much
    assert not fit(800, 800, (1024, 1024)).upscaled_much
