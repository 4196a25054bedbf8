"""Regularisation sets (`[[data]] regularisation = true`): their share of every epoch, their loss weight, captions
without the trigger word, resume, the summary and `data inspect`, under ranks, and the config errors.

The tests that guard a line name it in their docstring, with the mutation they were checked to fail under.
"""

from __future__ import annotations

import io
import json
import math
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from train.test_loop import _interrupt_after, metrics
from zturbo_train import flow
from zturbo_train.cli import app
from zturbo_train.config import Config, load_config, validate_config
from zturbo_train.data import Encoders, prepare_dataset
from zturbo_train.errors import ConfigError
from zturbo_train.lora.formats import read_lora_file
from zturbo_train.train.loop import run
from zturbo_train.train.step import StepSettings, TrainStep

runner = CliRunner()
REG_IMAGES = ("img_00", "img_01", "img_02", "img_03")
REG_CAPTION = "a square with a dot"


def reg_folder(root: Path, example_data: Path) -> Path:
    """Four of the example images as the 'class' set, captioned without the trigger (one with a [trigger] left in)."""
    folder = root / "reg"
    folder.mkdir(parents=True)
    for name in REG_IMAGES:
        shutil.copy(example_data / f"{name}.png", folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(REG_CAPTION)
    (folder / "img_03.txt").write_text(f"[trigger] {REG_CAPTION}")
    return folder


def tables(example_data: Path, reg: Path, **reg_keys) -> list[dict]:
    return [
        {"dir": str(example_data), "resolution": [64], "trigger_word": "sks"},
        {"dir": str(reg), "resolution": [64], "regularisation": True, **reg_keys},
    ]


def build(tiny_dir: Path, cache: Path, data: list[dict], console=None, **train):
    raw = {
        "model": {"path": "builtin:tiny", "dtype": "fp32"},
        "data": data,
        "train": {"batch_size": 2, "seed": 3, **train},
        "sample": {"prompts": ["a cube"]},
    }
    encoders = Encoders(tiny_dir, "cpu", "fp32", "fp32")
    return prepare_dataset(validate_config(raw), "cpu", encoders=encoders, cache_dir=cache, console=console)


@pytest.fixture(scope="module")
def reg(tmp_path_factory, example_data) -> Path:
    return reg_folder(tmp_path_factory.mktemp("regset"), example_data)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def is_reg(path: Path, reg: Path) -> bool:
    return path.is_relative_to(reg)


def epochs_seen(dataset, reg: Path, epochs: int) -> list[Counter]:
    """Per epoch, how often each image came out of the real loader (epoch read from the batches themselves)."""
    seen = [Counter() for _ in range(epochs)]
    with dataset.loader("cpu", prefetch=2) as loader:
        for batch in loader:
            if batch.epoch >= epochs:
                break
            seen[batch.epoch].update(batch.images)
    return seen


# ----------------------------------------------------------------------------- the mix


@pytest.mark.parametrize("ratio, expected", [(0.5, 6), (0.25, 2), (0.3, 3)])
def test_a_regularisation_set_is_its_ratio_of_every_epoch(tiny_dir, example_data, reg, cache, ratio, expected):
    """6 training images a epoch; a set of ratio r gets round(6 r / (1 - r)) samples of every epoch (by hand: 6, 2,
    2.57 -> 3), exactly, since the count is drawn whole each epoch; the share is r up to that rounding, at most
    half a sample of the epoch (0.3 -> 3/9). The draws walk seeded shuffles of the set, so over epochs every reg
    image is used as often as the others. Guards `reg_counts` (checked: r / (1 - r) -> r gives 3, 2, 2 and fails)
    and the extra draws in `epoch_batches` (checked: not added -> no reg image in any batch)."""
    dataset = build(tiny_dir, cache, tables(example_data, reg, ratio=ratio))
    epochs = 4
    seen = epochs_seen(dataset, reg, epochs)
    for counts in seen:
        regs = sum(n for path, n in counts.items() if is_reg(path, reg))
        assert regs == expected
        assert abs(regs / sum(counts.values()) - ratio) <= 0.5 / sum(counts.values())
        assert sorted(n for path, n in counts.items() if not is_reg(path, reg)) == [1] * 6  # the training set whole
    over_all = Counter(
        path.name for counts in seen for path, n in counts.items() for _ in range(n) if is_reg(path, reg)
    )
    assert sorted(over_all) == sorted(f"{name}.png" for name in REG_IMAGES)
    assert max(over_all.values()) - min(over_all.values()) <= 1  # used in turn: 4 epochs x count draws spread evenly


def test_the_mix_is_fixed_by_the_seed_and_resumes_exactly(tiny_dir, example_data, reg, cache):
    """The same seed gives the same batches, another seed other reg draws; a loader restored from its state goes on
    with exactly the batches (images, captions, latents, weights) it would have given. Guards the fingerprint's mix
    (checked: the mix left out of it -> a state saved under ratio 0.2 passes for one of ratio 0.4) and the draws
    keyed by (seed, set, cycle) alone (checked: keyed by the object too -> two builds differ, and so does a resumed
    training run)."""
    data = tables(example_data, reg, ratio=0.4, loss_weight=0.5)
    first, again = build(tiny_dir, cache, data), build(tiny_dir, cache, data)
    other = build(tiny_dir, cache, data, seed=4)
    order = [first.epoch_order(e) for e in range(3)]
    assert order == [again.epoch_order(e) for e in range(3)] and order != [other.epoch_order(e) for e in range(3)]
    with first.loader("cpu") as loader:
        [next(loader) for _ in range(first.batches_per_epoch + 2)]
        state = loader.state_dict()
        rest = [next(loader) for _ in range(first.batches_per_epoch)]
    with again.loader("cpu", state=state) as resumed:
        more = [next(resumed) for _ in range(first.batches_per_epoch)]
    for a, b in zip(rest, more):
        fields = ("epoch", "position", "images", "captions", "weights", "noise_seeds")
        assert [getattr(a, f) for f in fields] == [getattr(b, f) for f in fields]
        assert torch.equal(a.latents, b.latents)
    changed = build(tiny_dir, cache, tables(example_data, reg, ratio=0.2, loss_weight=0.5))
    assert changed.fingerprint != first.fingerprint and changed.data_fingerprint != first.data_fingerprint


def test_regularisation_captions_never_get_the_trigger_word(tiny_dir, example_data, reg, cache):
    """The training set's trigger is its own: every reg sample reaches the step with the class caption as written,
    and the [trigger] left in one is removed with a warning that says why. Guards the scan reading each table's
    own trigger_word (checked: 'sks' applied whatever the table -> 'sks a square ...' in the reg batches)."""
    dataset = build(tiny_dir, cache, tables(example_data, reg))
    captions = {
        (is_reg(path, reg), caption)
        for p in range(dataset.batches_per_epoch)
        for path, caption in zip(dataset.load_batch(0, p).images, dataset.load_batch(0, p).captions)
    }
    assert {c for r, c in captions if r} == {REG_CAPTION}
    assert all(c.startswith("sks ") for r, c in captions if not r)
    warning = [p for p in dataset.problems if p.kind == "trigger"]
    assert len(warning) == 1 and "a regularisation set shows the class without the trigger word" in warning[0].reason


# ----------------------------------------------------------------------------- the loss weight


def test_the_loss_weight_multiplies_the_regularisation_samples_loss(
    tiny_dir, tiny_transformer, example_data, reg, cache
):
    """A batch holding a reg sample (loss_weight 0.25) and a training one: the loader gives weights [0.25, 1] in
    slot order and the step's loss is mean_i(w_i * bell(s_i) * mse_i), each term computed here by hand. Guards
    `load_batch`'s weights (checked: loss_weights left out -> the batch carries no weights and the test fails)."""
    dataset = build(tiny_dir, cache, tables(example_data, reg, loss_weight=0.25))
    batches = (dataset.load_batch(e, p) for e in range(4) for p in range(len(dataset.epoch_order(e))))
    batch = next(b for b in batches if len({is_reg(x, reg) for x in b.images}) == 2)
    weights = [0.25 if is_reg(path, reg) else 1.0 for path in batch.images]
    assert batch.weights == weights
    settings = StepSettings.from_config(
        validate_config({"data": {"dir": "."}}).train, torch.float32, torch.device("cpu")
    )
    step = TrainStep(tiny_transformer, [], None, settings, torch.Generator().manual_seed(0))
    batch = step.draw_for(batch)
    with torch.no_grad():
        loss = step.loss(batch.latents, batch.text, batch.weights, batch.noise, batch.sigmas)
        xt = (1 - batch.sigmas.view(-1, 1, 1, 1)) * batch.latents + batch.sigmas.view(-1, 1, 1, 1) * batch.noise
        out = tiny_transformer(list(xt.unsqueeze(2).unbind(0)), 1.0 - batch.sigmas, batch.text, return_dict=False)[0]
        mse = (torch.stack(out).squeeze(2) - (batch.latents - batch.noise)).square().flatten(1).mean(1)
    bell = flow.bell_weights(batch.sigmas)
    by_hand = sum(w * b * m for w, b, m in zip(weights, bell.tolist(), mse.tolist())) / len(weights)
    assert math.isclose(loss.item(), by_hand, rel_tol=1e-5)
    unweighted = (bell * mse).mean().item()
    assert not math.isclose(loss.item(), unweighted, rel_tol=1e-3)


def test_ranks_cut_the_mixed_batches_as_one_process_sees_them(tiny_dir, example_data, reg, cache):
    """Under torchrun each rank trains its slice of the global batch: two ranks at batch 1 see, slot for slot, the
    images and loss weights of one process at batch 2, and a lone last sample (a reg one here, weight w = 0.25)
    goes to rank 0 at 2 w and is repeated on rank 1 at 0, so the ranks' mean is the batch's. Guards the rank
    weight in `load_batch`'s weights (checked: dropped -> rank 0 trains the lone reg sample at w, not 2 w)."""
    data = tables(example_data, reg, ratio=0.25, loss_weight=0.25)
    one = build(tiny_dir, cache, data, batch_size=2)
    ranks = [build(tiny_dir, cache, data, batch_size=1).for_rank(r, 2) for r in range(2)]
    lone_reg = 0
    for epoch in range(2):
        for p in range(one.batches_per_epoch):
            whole, parts = one.load_batch(epoch, p), [rank.load_batch(epoch, p) for rank in ranks]
            weights = whole.weights or [1.0] * len(whole.images)
            got = [(part.weights or [1.0])[0] for part in parts]
            if len(whole.images) == 2:
                assert [x for part in parts for x in part.images] == whole.images and got == weights
            else:
                assert parts[0].images == whole.images and got == [2 * weights[0], 0.0]
                lone_reg += is_reg(whole.images[0], reg)
    assert lone_reg  # the case that needs the rank weight was met


def test_validation_holds_out_training_images_only(tiny_dir, example_data, reg, cache):
    """train.val_fraction picks from the training images: a regularisation set is not what the LoRA learns, so
    none of it is held out, and its count follows the training samples left (5 -> round(5 * 1) = 5)."""
    dataset = build(tiny_dir, cache, tables(example_data, reg), val_fraction=0.2)
    held = {dataset.items[s.item].path for s, _ in dataset.heldout}
    assert len(held) == 1 and not any(is_reg(path, reg) for path in held)
    assert [mix.count for mix in dataset.mixes] == [5]


# ----------------------------------------------------------------------------- what is shown


def test_the_data_summary_names_the_regularisation_set(tiny_dir, example_data, reg, cache):
    out = io.StringIO()
    build(tiny_dir, cache, tables(example_data, reg, ratio=0.25, loss_weight=0.5), Console(file=out, width=400))
    assert (
        f"data: 10 images, 8 samples (2 of them from the regularisation set {reg}: 4 images, 25% of each epoch, "
        f"loss weight 0.5) in " in out.getvalue()
    )


def test_with_dop_the_summary_and_the_dry_run_do_not_count_the_set_as_images_missing_a_trigger(
    tmp_path, tiny_dir, example_data, reg, cache
):
    """A reg set has no trigger by design (refused), so DOP's part of the summary counts the training images only
    (it said `6 of the 10 trained images have the trigger word`, as if four lacked one) and the dry run's
    preservation row does not list the set as a table without a trigger_word (it said `[data] table 1 has no
    trigger_word`). Checked to fail with either line counting the set again."""
    out = io.StringIO()
    build(tiny_dir, cache, tables(example_data, reg), Console(file=out, width=400), preservation="dop")
    assert "; DOP: 6 of the 6 training images have the trigger word to replace" in out.getvalue()
    cfg = config_file(tmp_path, example_data, reg, preservation="dop")
    dry = runner.invoke(app, ["train", str(cfg), "--dry-run"], env={"COLUMNS": "400"})
    assert dry.exit_code == 0, dry.output
    row = next(line for line in dry.output.splitlines() if "dop: 'sks' -> 'person'" in line)
    assert "no trigger_word" not in row


def config_file(tmp_path: Path, example_data: Path, reg: Path, reg_keys: str = "", **train) -> Path:
    settings = {
        "steps": 6,
        "lr": 2e-3,
        "batch_size": 2,
        "seed": 3,
        "save_every": 0,
        "sample_every": 0,
        "log_every": 2,
        "gradient_checkpointing": False,
        "output_dir": str(tmp_path / "run"),
        "name": "t",
        **train,
    }
    body = "\n".join(f"{k} = {json.dumps(v)}" for k, v in settings.items())
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "cfg.toml"
    path.write_text(
        f'[model]\npath = "builtin:tiny"\nadapter = "builtin:tiny-adapter"\ndtype = "fp32"\n'
        f'[[data]]\ndir = {json.dumps(str(example_data))}\nresolution = 64\ntrigger_word = "sks"\n'
        f"[[data]]\ndir = {json.dumps(str(reg))}\nresolution = 64\nregularisation = true\n{reg_keys}\n"
        f"[lora]\nrank = 8\n[train]\n{body}\n[sample]\nprompts = []\nwidth = 64\nheight = 64\n",
        encoding="utf-8",
    )
    return path


def test_data_inspect_and_the_dry_run_show_the_regularisation_set(tmp_path, example_data, reg):
    cfg = config_file(tmp_path, example_data, reg, "ratio = 0.25\nloss_weight = 0.5")
    result = runner.invoke(app, ["data", "inspect", "--config", str(cfg)], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "Regularisation sets" in result.output and "(regularisation)" in result.output
    assert "10 images, 8 samples per epoch, 4 regularisation images, 2 regularisation samples" in result.output
    listed = runner.invoke(app, ["data", "inspect", "--config", str(cfg), "--json"])
    data = json.loads(listed.output)
    assert data["regularisation"] == [
        {"dir": str(reg), "images": 4, "samples_per_epoch": 2, "ratio": 0.25, "loss_weight": 0.5}
    ]
    assert sum(image["regularisation"] for image in data["images"]) == 4
    dry = runner.invoke(app, ["train", str(cfg), "--dry-run"], env={"COLUMNS": "300"})
    assert dry.exit_code == 0, dry.output
    assert f"{reg}: 4 images, 2 samples per epoch (ratio 0.25), loss weight 0.5" in dry.output


# ----------------------------------------------------------------------------- training end to end


def test_training_with_a_regularisation_set_resumes_bit_exactly(tmp_path, example_data, reg, monkeypatch):
    """Stopped at step 3 (SIGINT) and resumed, a run with a reg set ends with the very LoRA and losses of the run
    left alone; the reg loss weight reaches the logged loss (it differs from the same run at weight 1)."""
    keys = "ratio = 0.4\nloss_weight = 0.5"
    full = run(load_config(config_file(tmp_path / "a", example_data, reg, keys)), quiet=True)
    cfg_b = config_file(tmp_path / "b", example_data, reg, keys)
    _interrupt_after(monkeypatch, 3)
    result = runner.invoke(app, ["train", str(cfg_b), "--quiet"])
    assert result.exit_code == 130, result.output
    monkeypatch.undo()
    resumed = run(load_config(cfg_b), resume=True, quiet=True)
    a, b = read_lora_file(full.lora_path)[0], read_lora_file(resumed.lora_path)[0]
    assert all(torch.equal(a[k].down, b[k].down) and torch.equal(a[k].up, b[k].up) for k in a)
    assert [r["loss"] for r in metrics(full.run_dir)] == [r["loss"] for r in metrics(resumed.run_dir)]
    header = read_lora_file(full.lora_path)[1]
    assert json.loads(header["zturbo.regularisation"]) == [{"dir": str(reg), "ratio": 0.4, "loss_weight": 0.5}]
    assert header["zturbo.trigger_word"] == "sks"
    report = (full.run_dir / "report.html").read_text()
    assert "regularisation set (ratio 0.4 of each epoch), loss weight 0.5" in report
    plain = run(load_config(config_file(tmp_path / "c", example_data, reg, "ratio = 0.4")), quiet=True)
    assert [r["loss"] for r in metrics(plain.run_dir)] != [r["loss"] for r in metrics(full.run_dir)]


# ----------------------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    "reg_keys, message",
    [
        ({"is_reg": True}, "unknown key `data[1].is_reg`; did you mean `data[1].regularisation`?"),
        ({"is_regularisation_data": True}, "did you mean `data[1].regularisation`?"),
        ({"regularisation": True, "prior_loss_weight": 0.5}, "did you mean `data[1].loss_weight`?"),
        ({"regularisation": True, "reg_ratio": 0.3}, "did you mean `data[1].ratio`?"),
        ({"ratio": 0.3}, "`ratio` applies to regularisation sets only"),
        ({"regularisation": True, "trigger_word": "sks"}, "takes no trigger_word; remove trigger_word = 'sks'"),
        ({"regularisation": True, "repeats": 3}, "is its `ratio`, not `repeats`"),
        ({"regularisation": True, "ratio": 1.0}, "`data[1].ratio` = 1.0: input should be less than 1"),
        ({"regularisation": True, "loss_weight": 0}, "`data[1].loss_weight` = 0: input should be greater than 0"),
    ],
)
def test_config_errors_are_one_line_with_the_fix(reg_keys, message):
    raw = {"data": [{"dir": "train", "trigger_word": "sks"}, {"dir": "reg", **reg_keys}]}
    with pytest.raises(ConfigError) as err:
        validate_config(raw)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_only_regularisation_sets_or_ratios_adding_to_one_are_refused():
    with pytest.raises(ConfigError, match="every \\[\\[data\\]\\] table is a regularisation set .* nothing to train"):
        validate_config({"data": [{"dir": "reg", "regularisation": True}]})
    with pytest.raises(ConfigError, match="ratios add up to 0.5 \\+ 0.5 = 1, leaving no share .* to the training"):
        validate_config(
            {"data": [{"dir": "a"}, {"dir": "b", "regularisation": True}, {"dir": "c", "regularisation": True}]}
        )
    cfg = validate_config(
        {
            "data": [
                {"dir": "a"},
                {"dir": "b", "regularisation": True, "ratio": 0.3},
                {"dir": "c", "regularisation": True, "ratio": 0.3},
            ]
        }
    )
    assert [d.regularisation for d in cfg.train_data] == [False]


@pytest.mark.parametrize(
    "train_dir, reg_dir, where",
    [("/d/me", "/d/me/reg", "is in"), ("/d/me", "/d/me", "is"), ("/d/people/me", "/d/people", "holds")],
)
def test_a_regularisation_set_overlapping_a_training_folder_is_refused(train_dir, reg_dir, where):
    """Folders are searched recursively, so a reg set inside the training folder was also trained as the subject,
    its captions given the trigger word (`DOP: 8 of the 10 trained images have the trigger word` for 6 training and
    2 reg images), and one around it trained the subject as the class: refused in one line with the fix; a folder
    beside it (`/d/me-reg`, a name that merely starts alike) passes. Checked to fail with the check removed."""
    raw = {"data": [{"dir": train_dir, "trigger_word": "sks"}, {"dir": reg_dir, "regularisation": True}]}
    with pytest.raises(ConfigError) as err:
        validate_config(raw)
    message = str(err.value)
    assert f"the regularisation set {reg_dir} {where} the training folder {train_dir}" in message
    assert "move the regularisation images to a folder of their own" in message and "\n" not in message
    validate_config({"data": [{"dir": "/d/me", "trigger_word": "sks"}, {"dir": "/d/me-reg", "regularisation": True}]})


def test_a_regularisation_config_round_trips_through_config_json():
    """config.json (model_dump) read back is the same config: a resume reads it so (the default ratio stays unset)."""
    cfg = validate_config({"data": [{"dir": "/a"}, {"dir": "/b", "regularisation": True, "loss_weight": 0.5}]})
    again = Config.model_validate(cfg.model_dump(mode="json"))
    assert again == cfg and again.data[1].share == 0.5 and again.data[0].share == 0.0
