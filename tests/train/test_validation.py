"""Validation loss on held-out images: logged at its steps, deterministic for a fixed LoRA, never trained on."""

from __future__ import annotations

import shutil

import pytest
import torch

from train.test_loop import make_config, metrics
from zturbo_train.config import load_config
from zturbo_train.errors import DataError
from zturbo_train.lora.formats import LoraWeights, read_lora_file
from zturbo_train.train.loop import run, setup, validation_loss


def test_val_loss_is_logged_at_its_steps_and_equals_the_saved_loras(tmp_path, example_data):
    """val_every 3 of 7 steps: rows 3, 6 and the last carry val_loss, the others not. The last one equals the loss
    recomputed in a fresh session with the saved LoRA loaded (so it is the LoRA's, with the adapter as in
    training), twice, with other global RNG states in between: deterministic for a fixed LoRA."""
    cfg_path = make_config(tmp_path, example_data, steps=7, save_every=0, sample_every=0, log_every=5, lr=5e-3)
    cfg = load_config(cfg_path, ["train.val_fraction=0.34", "train.val_every=3"])
    result = run(cfg, quiet=True)
    rows = metrics(result.run_dir)
    assert [r["step"] for r in rows if "val_loss" in r] == [3, 6, 7]
    assert rows[2]["val_loss"] != rows[-1]["val_loss"]  # the LoRA changed between them

    fresh = load_config(
        cfg_path, ["train.val_fraction=0.34", "train.val_every=3", f"train.output_dir={tmp_path / 'fresh'}"]
    )
    s = setup(fresh, resume=False, overwrite=False, console=None)
    try:
        lora = read_lora_file(result.lora_path)[0]
        before = validation_loss(s)
        s.network.load_lora_dict({k: LoraWeights(v.down, v.up) for k, v in lora.items()})
        torch.manual_seed(123)
        first = validation_loss(s)
        torch.manual_seed(456)
        torch.rand(10)
        second = validation_loss(s)
    finally:
        s.adapter.deactivate()
    assert torch.equal(first, second)
    assert float(first) == pytest.approx(rows[-1]["val_loss"], rel=1e-6, abs=0)
    assert float(before) != float(first)


def test_heldout_images_are_never_trained_on(tmp_path, example_data):
    """val_fraction holds out 2 of 6 images, chosen by seed; val_dir adds its own. No batch of two epochs holds
    one of them; every other image is trained on."""
    cfg = load_config(make_config(tmp_path, example_data, steps=2), ["train.val_fraction=0.34"])
    s = setup(cfg, resume=False, overwrite=False, console=None)
    try:
        held = {s.dataset.items[sample.item].path for sample, _ in s.dataset.heldout}
        assert len(held) == 2 and len(s.validation.latents) == 2
        seen = set()
        with s.dataset.loader("cpu") as loader:
            for _ in range(2 * s.dataset.batches_per_epoch):
                seen |= set(next(loader).images)
    finally:
        s.adapter.deactivate()
    assert not seen & held and seen | held == set(sorted(example_data.glob("*.png")))

    val_dir = tmp_path / "val"
    val_dir.mkdir()
    for name in ("img_00.png", "img_00.txt"):
        shutil.copy(example_data / name, val_dir / name.replace("img", "val"))
    cfg = load_config(make_config(tmp_path / "b", example_data, steps=2), [f"train.val_dir={val_dir}"])
    s = setup(cfg, resume=False, overwrite=False, console=None)
    try:
        assert [s.dataset.items[sample.item].path for sample, _ in s.dataset.heldout] == [val_dir / "val_00.png"]
        assert {s.dataset.items[sample.item].path for sample in s.dataset.samples} == set(example_data.glob("*.png"))
    finally:
        s.adapter.deactivate()


def test_a_val_fraction_that_leaves_nothing_to_train_is_one_clear_error(tmp_path, example_data):
    cfg = load_config(make_config(tmp_path, example_data, steps=2), ["train.val_fraction=0.95"])
    with pytest.raises(DataError, match=r"train.val_fraction = 0.95 holds out 6 of the 6 images, leaving none"):
        run(cfg, quiet=True)
