"""Scanning a folder: caption rules, pixel modes, and every bad input with its message."""

import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zturbo_train.config import DataConfig
from zturbo_train.data.dataset import apply_trigger, drop_caption, load_rgb, normalise, scan_datasets
from zturbo_train.data.prepare import scan_and_plan
from zturbo_train.errors import DataError


def image(path: Path, size=(80, 80), color=(200, 30, 30), mode="RGB", caption: str | bytes | None = "a thing") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    if caption is not None:
        data = caption if isinstance(caption, bytes) else caption.encode()
        path.with_suffix(".txt").write_bytes(data)
    return path


def scan(folder: Path, **options):
    return scan_datasets([DataConfig(dir=folder, **options)])


def only_problem(result, level=None):
    assert len(result.problems) == 1, result.problems
    problem = result.problems[0]
    assert level is None or problem.level == level
    return problem


# ----------------------------------------------------------------------------- captions


def test_example_dataset_scans_clean(example_data):
    result = scan(example_data, trigger_word="sks")
    assert len(result.items) == 6 and result.problems == []
    assert result.items[0].caption == "sks a red square with a yellow dot on a blue floor"
    assert [i.path.name for i in result.items] == sorted(i.path.name for i in result.items)


def test_caption_bom_and_whitespace(tmp_path):
    image(tmp_path / "a.png", caption=b"\xef\xbb\xbf  a  red\tcube\r\n\non  the floor \n")
    assert scan(tmp_path).items[0].caption == "a red cube on the floor"


@pytest.mark.parametrize(
    "caption,trigger,expected",
    [
        ("[trigger] a cat", "sks", "sks a cat"),
        ("a photo of [trigger], [trigger] smiling", "ohwx man", "a photo of ohwx man, ohwx man smiling"),
        ("a cat", "sks", "sks, a cat"),
        ("a cat", "", "a cat"),
        ("", "sks", "sks"),
        ("[trigger]  a cat", "", "a cat"),
    ],
)
def test_trigger_rules(caption, trigger, expected):
    assert apply_trigger(normalise(caption), trigger) == expected


def test_trigger_placeholder_without_trigger_word_warns(tmp_path):
    image(tmp_path / "a.png", caption="[trigger] a cat")
    result = scan(tmp_path)
    assert result.items[0].caption == "a cat"
    problem = only_problem(result, "warn")
    assert "caption has [trigger] but data.trigger_word is not set" in problem.reason


def test_other_caption_extension(tmp_path):
    image(tmp_path / "a.png", caption=None)
    (tmp_path / "a.caption").write_text("from the other file")
    assert scan(tmp_path, caption_ext=".caption").items[0].caption == "from the other file"


def test_caption_dropout_rate():
    rng = random.Random(0)
    drops = [drop_caption("x", 0.25, rng) for _ in range(4000)]
    assert 0.22 < drops.count("") / 4000 < 0.28
    assert all(drop_caption("x", 0.0, rng) == "x" for _ in range(100))
    assert all(drop_caption("x", 1.0, rng) == "" for _ in range(100))


def test_missing_caption_is_an_error_without_default(tmp_path):
    image(tmp_path / "a.png", caption=None)
    result = scan(tmp_path)
    problem = only_problem(result, "error")
    assert problem.reason == "has no caption file a.txt; write a caption there or set data.default_caption"
    pattern = r"(?s)1 dataset problem found before training .*a\.png: has no caption file a\.txt"
    with pytest.raises(DataError, match=pattern):
        result.raise_errors()


def test_missing_caption_uses_default_with_a_warning(tmp_path):
    image(tmp_path / "a.png", caption=None)
    result = scan(tmp_path, default_caption="a photo of [trigger]", trigger_word="sks")
    assert result.items[0].caption == "a photo of sks" and result.items[0].caption_source == "default"
    problem = only_problem(result, "warn")
    assert problem.reason == "has no caption file a.txt; using data.default_caption 'a photo of [trigger]'"


def test_strict_turns_the_default_caption_warning_into_an_error(tmp_path):
    image(tmp_path / "a.png", caption=None)
    image(tmp_path / "b.png")
    result = scan(tmp_path, default_caption="x", strict=True)
    problem = only_problem(result, "error")
    assert problem.reason.endswith("(an error because data.strict = true)")
    assert [i.path.name for i in result.items] == ["b.png"]
    with pytest.raises(DataError, match="using data.default_caption"):
        result.raise_errors()


def test_zero_byte_caption(tmp_path):
    image(tmp_path / "a.png", caption=b"")
    problem = only_problem(scan(tmp_path), "error")
    assert problem.reason == "caption file a.txt is empty; write a caption there or set data.default_caption"
    result = scan(tmp_path, default_caption="")
    assert result.items[0].caption == "" and only_problem(result, "warn").kind == "empty_caption"


def test_non_utf8_caption_names_the_file(tmp_path):
    image(tmp_path / "a.png", caption="caf\xe9".encode("latin-1"))
    problem = only_problem(scan(tmp_path), "error")
    assert problem.path == tmp_path / "a.txt"
    assert problem.reason == "caption is not UTF-8 (byte 0xe9 at position 3); re-save it as UTF-8"
    with pytest.raises(DataError, match=r"a\.txt: caption is not UTF-8"):
        scan(tmp_path).raise_errors()


def test_all_errors_are_listed_at_once(tmp_path):
    image(tmp_path / "a.png", caption=None)
    image(tmp_path / "b.png", caption=b"\xff\xfe")
    image(tmp_path / "c.png")
    with pytest.raises(DataError) as err:
        scan_and_plan([DataConfig(dir=tmp_path)])
    message = str(err.value)
    assert message.startswith("2 dataset problems found before training (nothing was encoded)")
    assert "a.png: has no caption file" in message and "b.txt: caption is not UTF-8" in message


# ----------------------------------------------------------------------------- folders


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match=r"`data.dir` .*nope does not exist; set it to a folder of images"):
        scan(tmp_path / "nope")


def test_empty_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"holds no images \(.jpg, .jpeg, .png, .webp, .bmp\); put your training"):
        scan(tmp_path)


def test_folder_is_a_file(tmp_path):
    (tmp_path / "f.png").write_bytes(b"")
    with pytest.raises(DataError, match="is a file, not a folder"):
        scan(tmp_path / "f.png")


def test_recursive_scan_ignores_hidden_folders(tmp_path):
    image(tmp_path / "a.png")
    image(tmp_path / "sub" / "deeper" / "b.JPG")
    image(tmp_path / ".cache" / "c.png")
    image(tmp_path / "._a.png")
    result = scan(tmp_path)
    assert sorted(i.path.name for i in result.items) == ["a.png", "b.JPG"]
    assert only_problem(result, "skip").reason.startswith("hidden file")


def test_nothing_usable(tmp_path):
    (tmp_path / "a.png").write_bytes(b"not an image")
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(DataError, match=r"no usable image in `data.dir` .*all 1 were skipped \(is not an image"):
        scan(tmp_path)


# ----------------------------------------------------------------------------- bad images


def test_truncated_image_is_skipped_up_front(tmp_path):
    image(tmp_path / "good.png")
    path = image(tmp_path / "bad.png", size=(128, 128))
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:2000])
    result = scan(tmp_path)
    problem = only_problem(result, "skip")
    assert problem.path == path and problem.reason.startswith("is truncated or corrupt (")
    assert problem.reason.endswith("left out; re-export or replace it")
    assert [i.path.name for i in result.items] == ["good.png"]


def test_non_image_with_image_extension(tmp_path):
    image(tmp_path / "good.png")
    (tmp_path / "fake.jpg").write_text("I am a text file")
    (tmp_path / "fake.txt").write_text("caption")
    problem = only_problem(scan(tmp_path), "skip")
    assert problem.reason == (
        "is not an image Pillow can read (wrong extension or not an image), left out; "
        "delete it or convert it to PNG/JPEG"
    )


def test_tiny_image_is_skipped(tmp_path):
    image(tmp_path / "good.png")
    image(tmp_path / "tiny.png", size=(100, 40))
    problem = only_problem(scan(tmp_path), "skip")
    assert problem.reason == "is 100x40 px, smaller than the 64 px minimum, left out; use a larger image"


def test_a_config_that_trains_below_64_px_takes_images_of_that_size(tmp_path):
    """resolution = 32 (the Turbo lab's) lowers the minimum to 32 px; smaller is still left out."""
    image(tmp_path / "a.png", size=(32, 32))
    image(tmp_path / "b.png", size=(24, 24))
    problem = only_problem(scan(tmp_path, resolution=32), "skip")
    assert problem.reason == "is 24x24 px, smaller than the 32 px minimum, left out; use a larger image"


def test_strict_makes_a_skip_an_error(tmp_path):
    image(tmp_path / "good.png")
    image(tmp_path / "tiny.png", size=(32, 32))
    assert only_problem(scan(tmp_path, strict=True), "error").kind == "small_image"


def test_upscaled_image_warns_and_strict_refuses(tmp_path):
    image(tmp_path / "a.png", size=(96, 96))
    result, _ = scan_and_plan([DataConfig(dir=tmp_path, resolution=[64, 256])])
    problem = only_problem(result, "warn")
    assert problem.reason.startswith("is 96x96 px, upscaled 2.7x to the 256x256 bucket of resolution 256")
    with pytest.raises(DataError, match="upscaled 2.7x.*an error because data.strict = true"):
        scan_and_plan([DataConfig(dir=tmp_path, resolution=[256], strict=True)])


# ----------------------------------------------------------------------------- pixel modes


def encoded(img: Image.Image, fmt="PNG", **save) -> bytes:
    import io

    buffer = io.BytesIO()
    img.save(buffer, fmt, **save)
    return buffer.getvalue()


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (80, 64), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 10, 10))  # a white mark top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs a 90 degree clockwise turn
    out = load_rgb(encoded(img, "JPEG", exif=exif.tobytes(), quality=95))
    assert out.size == (64, 80)
    assert out.getpixel((60, 3))[0] > 200  # top-left mark is now top-right


@pytest.mark.parametrize("mode,color", [("RGBA", (10, 20, 30, 0)), ("LA", (40, 0))])
def test_transparency_is_composited_on_white(mode, color):
    out = load_rgb(encoded(Image.new(mode, (8, 8), color)))
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255)


def test_half_transparent_blends_with_white():
    out = load_rgb(encoded(Image.new("RGBA", (8, 8), (0, 0, 0, 128))))
    assert all(abs(c - 127) <= 1 for c in out.getpixel((0, 0)))


def test_palette_with_and_without_transparency():
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    assert load_rgb(encoded(pal)).getpixel((0, 0)) == (200, 100, 50)
    assert load_rgb(encoded(pal, transparency=1)).getpixel((0, 0)) == (255, 255, 255)


def test_16_bit_grayscale_is_scaled_not_clipped():
    array = np.full((8, 8), 32768, dtype=np.uint16)
    array[0, 0] = 65535
    out = load_rgb(encoded(Image.fromarray(array)))
    assert out.mode == "RGB"
    assert out.getpixel((1, 1)) == (128, 128, 128) and out.getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize(
    "mode,color,expected",
    [
        ("L", 77, (77, 77, 77)),
        ("1", 1, (255, 255, 255)),
        ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
    ],
)
def test_other_modes_become_rgb(mode, color, expected):
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    out = load_rgb(encoded(Image.new(mode, (8, 8), color), fmt, **({"quality": 100} if fmt == "JPEG" else {})))
    assert out.mode == "RGB"
    assert all(abs(a - b) <= 3 for a, b in zip(out.getpixel((4, 4)), expected))


@pytest.mark.parametrize("ext,fmt", [(".webp", "WEBP"), (".bmp", "BMP"), (".jpeg", "JPEG")])
def test_every_extension_scans(tmp_path, ext, fmt):
    Image.new("RGB", (70, 90), (1, 2, 3)).save(tmp_path / f"a{ext}", fmt)
    (tmp_path / "a.txt").write_text("x")
    item = scan(tmp_path).items[0]
    assert (item.width, item.height) == (70, 90)


# ----------------------------------------------------------------------------- what a new user hits (issue 12)


def test_image_cropped_by_more_than_half_warns_with_the_share_lost(tmp_path):
    """800x80 (10:1) goes to 64 px's widest bucket, 128x32: scaled by max(128/800, 32/80) = 0.4 to 320x32,
    then 128 of 320 columns are kept, so 1 - 128*32 / (320*32) = 60 % is cut off. A 2:1 image loses 17 %
    to its 80x48 bucket (scaled 0.6 to 96x48): no warning. Fails if the check is dropped or the share
    is computed the other way round (40 %, under the threshold)."""
    image(tmp_path / "wide.png", size=(800, 80))
    image(tmp_path / "two.png", size=(160, 80))
    result, _ = scan_and_plan([DataConfig(dir=tmp_path, resolution=[64])])
    problem = only_problem(result, "warn")
    assert problem.path == tmp_path / "wide.png" and problem.kind == "cropped"
    assert problem.reason == (
        "is 800x80 px, centre-cropped to the 128x32 bucket of resolution 64, which cuts off "
        "60% of the picture; crop it yourself to what matters"
    )
    with pytest.raises(DataError, match=r"wide\.png: .*cuts off 60%.*an error because data.strict = true"):
        scan_and_plan([DataConfig(dir=tmp_path, resolution=[64], strict=True)])


def run_folder(root: Path, *markers: str) -> Path:
    """A folder laid out like a zturbo run: previews without captions, plus the given marker files."""
    image(root / "samples" / "step-000000" / "00.png", caption=None)
    (root / "config.json").write_text("{}")
    for marker in markers:
        (root / marker).mkdir() if marker == "state" else (root / marker).write_text("")
    return root


def test_run_folder_inside_data_dir_is_never_read(tmp_path):
    image(tmp_path / "a.png")
    old = run_folder(tmp_path / "output" / "old-run", "metrics.jsonl")
    fresh = tmp_path / "output" / "this-run"  # the configured output_dir: only previews so far
    image(fresh / "samples" / "00.png", caption=None)
    result = scan_datasets([DataConfig(dir=tmp_path)], exclude=[fresh])
    assert [i.path.name for i in result.items] == ["a.png"]
    notes = result.at("note")
    assert [(p.path, p.kind) for p in notes] == [(old, "run_folder"), (fresh, "run_folder")]
    assert notes[0].reason.startswith("is a zturbo run folder inside data.dir: its files")
    assert result.at("error", "skip", "warn") == []
    # a folder with a config.json but none of a run's other files is a dataset folder like any other
    image(tmp_path / "sub" / "b.png")
    (tmp_path / "sub" / "config.json").write_text("{}")
    assert sorted(i.path.name for i in scan(tmp_path).items) == ["a.png", "b.png"]
    assert len(scan(tmp_path, strict=True).at("note")) == 1  # a note, never an error


def test_orphan_captions_are_listed(tmp_path):
    image(tmp_path / "a.png")
    (tmp_path / "gone.txt").write_text("its image was deleted")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.txt").write_text("no image either")
    (tmp_path / "._a.txt").write_bytes(b"\x00macOS metadata")
    result = scan(tmp_path)
    orphans = result.at("warn")
    assert [p.path for p in orphans] == [tmp_path / "gone.txt", tmp_path / "sub" / "x.txt"]
    assert all(p.kind == "orphan_caption" for p in orphans)
    assert orphans[0].reason == (
        "caption file with no image of the same name beside it, not used; add its image or delete it"
    )
    assert [p.path.name for p in scan(tmp_path, caption_ext="caption").at("warn")] == []


def test_one_report_names_every_problem_in_the_folder(tmp_path):
    """The case from issue 12: a non-UTF-8 caption used to stop the run while three unreadable images
    beside it went unmentioned. Every problem, of every level, is in the one error."""
    image(tmp_path / "good.png")
    image(tmp_path / "latin.png", caption="caf\xe9".encode("latin-1"))
    image(tmp_path / "nocaption.png", caption=None)
    (tmp_path / "fake.jpg").write_text("I am a text file")
    (tmp_path / "fake.txt").write_text("caption")
    image(tmp_path / "empty.png").write_bytes(b"")
    truncated = image(tmp_path / "truncated.png", size=(128, 128))
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:2000])
    (tmp_path / "orphan.txt").write_text("no image")
    with pytest.raises(DataError) as err:
        scan_and_plan([DataConfig(dir=tmp_path, resolution=[64])])
    message = str(err.value)
    assert message.startswith(
        "2 dataset problems found before training (nothing was encoded); fix them and run again:\n  "
    )
    assert "latin.txt: caption is not UTF-8" in message and "nocaption.png: has no caption file" in message
    assert "\nalso found (4; not errors: skipped files are left out, warnings are worth a look):\n" in message
    for name, reason in (
        ("fake.jpg", "is not an image Pillow can read"),
        ("empty.png", "is not an image Pillow can read"),
        ("truncated.png", "is truncated or corrupt"),
        ("orphan.txt", "caption file with no image"),
    ):
        label = "warning" if name == "orphan.txt" else "skipped"
        assert f"  {label}: {tmp_path / name}: {reason}" in message, name


def test_nothing_usable_lists_every_skipped_file(tmp_path):
    (tmp_path / "a.png").write_bytes(b"not an image")
    (tmp_path / "b.png").write_bytes(b"")
    with pytest.raises(DataError) as err:
        scan(tmp_path, default_caption="x")
    message = str(err.value)
    assert message.startswith(f"no usable image in `data.dir` {tmp_path}: all 2 were skipped")
    assert f"skipped: {tmp_path / 'a.png'}: is not an image" in message
    assert f"skipped: {tmp_path / 'b.png'}: is not an image" in message
