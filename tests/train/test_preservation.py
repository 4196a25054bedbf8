"""train.preservation = "dop": the class caption's prediction stays the base model's.

Each test names the mutation it was checked against: the test fails with it and passes without.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from train.test_loop import _interrupt_after, make_config, metrics
from train.test_step import bell, inputs, pipeline_call
from zturbo_train import flow
from zturbo_train.config import TrainConfig, load_config, validate_config
from zturbo_train.data.dataset import class_caption
from zturbo_train.errors import ConfigError
from zturbo_train.lora.formats import LoraWeights, read_lora_file
from zturbo_train.lora.network import create_lora
from zturbo_train.train.loop import run, setup
from zturbo_train.train.preservation import Preservation
from zturbo_train.train.step import StepSettings, TrainStep

DOP = ["train.preservation=dop"]
# The bundled captions are "[trigger] a red square with a yellow dot ...", trigger_word "sks".
CLASS_CAPTIONS = {
    "img_00.png": "person a red square with a yellow dot on a blue floor",
    "img_01.png": "person a red square with a yellow dot in the middle",
    "img_02.png": "person a red square with a yellow dot near the corner",
    "img_03.png": "person a red square with a yellow dot on blue ground",
    "img_04.png": "person a red square with a yellow dot centered",
    "img_05.png": "person a red square with a yellow dot alone",
}


# ------------------------------------------------------------------------------ captions


def test_the_trigger_is_replaced_as_a_whole_word():
    """By hand: every whole-word trigger, nothing glued to letters ("asks" keeps its "sks"; str.replace, checked,
    writes "aperson"); no trigger: None (the sample is left out of DOP); spacing normalised; regex-safe."""
    assert class_caption("sks, a photo of sks who asks", "sks", "person") == "person, a photo of person who asks"
    assert class_caption("a photo of a dog", "sks", "person") is None
    assert class_caption("sks", "sks", "young woman") == "young woman"
    assert class_caption("<ohwx> man, sks_2", "<ohwx>", "person") == "person man, sks_2"
    assert class_caption("a.b sks", "a.b", r"\1 x") == r"\1 x sks"
    assert class_caption("anything", "", "person") is None


def test_class_captions_are_cached_with_the_captions_and_come_with_each_batch(tmp_path, example_data):
    """The batch carries the embedding of each sample's class caption written out by hand; another class word is
    encoded anew (the cache is keyed by the caption text). Checked to fail with the class captions left out of
    the cache (the batch cannot find their embeddings)."""
    cfg = load_config(make_config(tmp_path, example_data, steps=2, sample_every=0), DOP)
    s = setup(cfg, resume=False, overwrite=False, console=None)
    try:
        by_image = {item.path.name: c for item, c in zip(s.dataset.items, s.dataset.class_captions)}
        assert by_image == CLASS_CAPTIONS
        with s.dataset.loader("cpu") as loader:
            batch = next(loader)
        want = s.dataset.prompt_embeddings([CLASS_CAPTIONS[p.name] for p in batch.images])
        assert batch.preserve is None and len(batch.class_text) == len(batch.images) == 2
        assert all(torch.equal(a, b) for a, b in zip(batch.class_text, want))
        assert not torch.equal(batch.class_text[0], batch.text[0])
    finally:
        s.adapter.deactivate()
    dog = load_config(
        make_config(tmp_path / "dog", example_data, steps=2, sample_every=0), [*DOP, "train.preservation_class=dog"]
    )
    s = setup(dog, resume=False, overwrite=False, console=None)
    try:
        assert s.dataset.stats.texts_encoded == 6  # the six "dog ..." captions; the rest reused
        assert sorted(s.dataset.class_captions)[0] == "dog a red square with a yellow dot alone"
    finally:
        s.adapter.deactivate()


# ------------------------------------------------------------------------------ the step


def _dop_step(transformer, weight: float = 1.0, **train):
    """A TrainStep with DOP on a tiny LoRA whose up matrices are random (so it changes the output)."""
    network = create_lora(transformer, 4, 4.0, ["layers"], ["to_q", "to_v", "w1"], seed=1)
    with torch.no_grad():
        for layer in network.layers:
            layer.up.normal_(0, 0.2, generator=torch.Generator().manual_seed(2))
    params = network.trainable_parameters()
    settings = StepSettings.from_config(TrainConfig(**train), torch.float32, torch.device("cpu"))
    preservation = Preservation(network, weight)
    return TrainStep(transformer, params, None, settings, torch.Generator().manual_seed(0), preservation=preservation)


def test_dop_loss_is_the_loras_class_prediction_against_the_detached_base_by_hand(tiny_transformer):
    """The target is the model with the LoRA detached (not switched: detached, the exact base), on the class
    captions at the batch's own noise and sigmas, bell-weighted; a sample with preserve 0 adds nothing. Checked
    to fail with the target computed with the LoRA on (the loss is then 0), and with the sigmas redrawn."""
    step = _dop_step(tiny_transformer)
    x0, noise, caps = inputs(torch.float32)
    classes = inputs(torch.float32, seed=5)[2]
    sigmas = torch.tensor([0.3, 0.5, 0.8])
    loss, dop = step.backward_preserving(x0, caps, classes, noise=noise, sigmas=sigmas, preserve=[1.0, 0.0, 1.0])
    xt = (1 - sigmas.view(-1, 1, 1, 1)) * x0 + sigmas.view(-1, 1, 1, 1) * noise
    with torch.no_grad():
        on = pipeline_call(tiny_transformer, xt, sigmas, classes)
        step.preservation.network.detach()
        base = pipeline_call(tiny_transformer, xt, sigmas, classes)
        step.preservation.network.attach(tiny_transformer)
    per_sample = (on - base).square().flatten(1).mean(1)
    want = (per_sample * bell(sigmas) * torch.tensor([1.0, 0.0, 1.0])).mean()
    assert float(dop) > 1e-4
    assert torch.allclose(dop, want, rtol=1e-5, atol=0)
    assert torch.equal(loss, step.loss(x0, caps, noise=noise, sigmas=sigmas))
    assert step.preservation.network.enabled  # switched back on after the target


def test_the_weight_scales_dops_gradient(tiny_transformer):
    """grad(weight 3) - grad(training loss alone) = 3 x (grad(weight 1) - grad(training loss alone)): DOP's
    gradient is added at its weight. Checked to fail with the weight ignored."""
    step = _dop_step(tiny_transformer)
    x0, noise, caps = inputs(torch.float32)
    classes = inputs(torch.float32, seed=5)[2]
    sigmas = torch.tensor([0.3, 0.5, 0.8])

    def grads(call) -> torch.Tensor:
        for p in step.params:
            p.grad = None
        call()
        return torch.cat([p.grad.flatten() for p in step.params])

    alone = grads(lambda: step.backward(x0, caps, noise=noise, sigmas=sigmas))
    with_one = grads(lambda: step.backward_preserving(x0, caps, classes, noise=noise, sigmas=sigmas))
    step.preservation = Preservation(step.preservation.network, 3.0)
    with_three = grads(lambda: step.backward_preserving(x0, caps, classes, noise=noise, sigmas=sigmas))
    assert float((with_one - alone).abs().max()) > 1e-6
    assert torch.allclose(with_three - alone, 3 * (with_one - alone), rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------------------ end to end


def _class_drift(cfg, lora_path) -> float:
    """Mean squared difference between base + LoRA and base (adapter as in training) on the six class captions,
    at fixed noise and four sigmas: how far the LoRA moved the class."""
    s = setup(cfg, resume=False, overwrite=True, console=None)
    try:
        lora = read_lora_file(lora_path)[0]
        s.network.load_lora_dict({k: LoraWeights(v.down, v.up) for k, v in lora.items()})
        s.network.eval()
        generator = torch.Generator().manual_seed(0)
        sigmas = torch.tensor([0.2, 0.4, 0.6, 0.8])
        total = 0.0
        with torch.no_grad():
            for embed in s.dataset.prompt_embeddings(list(CLASS_CAPTIONS.values())):
                x = torch.randn(4, 16, 8, 8, generator=generator)
                on = flow.predict(s.transformer, x, flow.model_time(sigmas), [embed] * 4)
                s.network.detach()
                off = flow.predict(s.transformer, x, flow.model_time(sigmas), [embed] * 4)
                s.network.attach(s.transformer)
                total += float((on - off).square().mean())
        return total / len(CLASS_CAPTIONS)
    finally:
        s.adapter.deactivate()


def test_dop_keeps_the_class_prediction_near_the_base_models(tmp_path, example_data):
    """Same data, seed and lr (20 steps at a high lr, so the LoRA moves): on the class captions, base + LoRA stays
    closer to the base with DOP than without. Measured: DOP's drift 0.27-0.33 of the plain run's (0.050 vs
    0.150 here); asserted under 0.5. dop_loss is logged per step beside loss. Checked to fail with the target
    computed with the LoRA on, and with DOP's backward left out."""
    settings = dict(steps=20, lr=1e-2, save_every=0, sample_every=0, log_every=10)
    no_previews = ["sample.prompts=[]"]
    plain = run(load_config(make_config(tmp_path / "plain", example_data, **settings), no_previews), quiet=True)
    dop = run(load_config(make_config(tmp_path / "dop", example_data, **settings), [*no_previews, *DOP]), quiet=True)
    probe = load_config(make_config(tmp_path / "probe", example_data, steps=1), DOP)
    drift_plain, drift_dop = _class_drift(probe, plain.lora_path), _class_drift(probe, dop.lora_path)
    assert drift_plain > 0.05  # the plain LoRA leaked into the class
    assert drift_dop < 0.5 * drift_plain, (drift_dop, drift_plain)
    rows = metrics(dop.run_dir)
    assert len(rows) == 20 and all("dop_loss" in r for r in rows) and rows[0]["dop_loss"] == 0.0  # up starts at 0
    assert max(r["dop_loss"] for r in rows) > 0
    assert "dop_loss" not in metrics(plain.run_dir)[0]


@pytest.mark.parametrize("mode", ["merge", "live"])
def test_the_target_keeps_the_training_adapter_in_both_modes(tmp_path, example_data, mode):
    """DOP's target is the model as trained without the user LoRA: the adapter stays (merged or live), only the
    trained LoRA is off. A 3-step run in the mode logs dop_loss. Checked to fail with the LoRA left on for the
    target."""
    extra = [*DOP, f"model.adapter_mode={mode}", "sample.prompts=[]"]
    cfg = load_config(make_config(tmp_path, example_data, steps=3, save_every=0, sample_every=0, lr=1e-2), extra)
    result = run(cfg, quiet=True)
    assert all("dop_loss" in r for r in metrics(result.run_dir))
    s = setup(
        load_config(make_config(tmp_path / "probe", example_data, steps=1), extra),
        resume=False,
        overwrite=False,
        console=None,
    )
    try:
        lora = read_lora_file(result.lora_path)[0]
        s.network.load_lora_dict({k: LoraWeights(v.down, v.up) for k, v in lora.items()})
        x, t = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0.5])
        embeds = s.dataset.prompt_embeddings([CLASS_CAPTIONS["img_00.png"]])
        target = s.step.preservation.base_prediction(s.step.forward, s.transformer, x, t, embeds)
        with torch.no_grad():
            with_lora = flow.predict(s.transformer, x, t, embeds)
            s.network.detach()
            trained_base = flow.predict(s.transformer, x, t, embeds)
            with s.adapter.inverted():
                plain_turbo = flow.predict(s.transformer, x, t, embeds)
    finally:
        s.adapter.deactivate()
    assert torch.allclose(target, trained_base, rtol=0, atol=1e-6)
    assert (target - with_lora).abs().max() > 1e-4  # the LoRA was off for the target
    assert (target - plain_turbo).abs().max() > 1e-4  # the adapter was not


def test_dop_resumes_bit_exactly(tmp_path, example_data, monkeypatch):
    """A DOP run without saves equals one stopped at step 4 and resumed, bit for bit (with LoRA dropout, whose
    draws DOP's second forward doubles). Checked to fail with the resumed run's DOP off."""
    extra = [*DOP, "lora.dropout=0.1", "sample.prompts=[]"]
    settings = dict(steps=6, sample_every=0, lr=5e-3)
    full = run(load_config(make_config(tmp_path / "a", example_data, save_every=0, **settings), extra), quiet=True)
    cfg = load_config(make_config(tmp_path / "b", example_data, save_every=2, **settings), extra)
    _interrupt_after(monkeypatch, 4)
    assert run(cfg, quiet=True).steps_done == 4
    monkeypatch.undo()
    resumed = run(cfg, resume=True, quiet=True)
    a, b = read_lora_file(full.lora_path)[0], read_lora_file(resumed.lora_path)[0]
    assert all(torch.equal(a[k].down, b[k].down) and torch.equal(a[k].up, b[k].up) for k in a)
    assert [r["dop_loss"] for r in metrics(full.run_dir)] == [r["dop_loss"] for r in metrics(resumed.run_dir)]


# ------------------------------------------------------------------------------ config


def _config(tmp_path, train: dict, trigger: str = "sks") -> dict:
    return {"data": {"dir": str(tmp_path), "trigger_word": trigger}, "train": train}


def test_config_keys_and_their_errors(tmp_path):
    """Defaults off / person / 1; ai-toolkit's boolean and key names lead to ours; no trigger word, an empty class
    word or the trigger as the class are one line each that says what to set."""
    train = validate_config(_config(tmp_path, {})).train
    assert (train.preservation, train.preservation_class, train.preservation_weight) == ("none", "person", 1.0)
    cfg = validate_config(_config(tmp_path, {"preservation": True, "preservation_class": "  young   woman "}))
    assert cfg.train.preservation == "dop" and cfg.train.preservation_class == "young woman"
    cases = {
        "diff_output_preservation": (True, "did you mean `train.preservation`?"),
        "diff_output_preservation_class": ("man", "did you mean `train.preservation_class`?"),
        "diff_output_preservation_multiplier": (2, "did you mean `train.preservation_weight`?"),
    }
    for key, (value, hint) in cases.items():
        with pytest.raises(ConfigError, match=f"unknown key `train.{key}`; {hint}"):
            validate_config(_config(tmp_path, {key: value}))
    with pytest.raises(ConfigError, match=r'needs a trigger word .* set data.trigger_word \(e.g. "sks"\)'):
        validate_config(_config(tmp_path, {"preservation": "dop"}, trigger=""))
    with pytest.raises(ConfigError, match=r"`train.preservation_class` = ' ': is empty; set the word"):
        validate_config(_config(tmp_path, {"preservation": "dop", "preservation_class": " "}))
    with pytest.raises(ConfigError, match=r"`train.preservation_class` = 'sks' is the trigger word itself"):
        validate_config(_config(tmp_path, {"preservation": "dop", "preservation_class": "sks"}))
    with pytest.raises(ConfigError, match=r"`train.preservation_weight` = 0"):
        validate_config(_config(tmp_path, {"preservation": "dop", "preservation_weight": 0}))
    with pytest.raises(ConfigError, match=r"`train.preservation` = 'yes'"):
        validate_config(_config(tmp_path, {"preservation": "yes"}))


def test_dry_run_states_dops_words_cost_and_memory(tmp_path, example_data):
    """The plan has a preservation row: the words replaced, the weight, the extra passes and their cost, the
    memory from the estimate, and which [data] table gets no DOP (no trigger word)."""
    from typer.testing import CliRunner

    from zturbo_train.cli import app

    cfg = make_config(tmp_path, example_data, steps=2)
    text = cfg.read_text().replace("[lora]", f'[[data]]\ndir = "{example_data}"\nresolution = 64\n[lora]')
    cfg.write_text(text.replace("[data]\n", "[[data]]\n"), encoding="utf-8")
    args = ["train", str(cfg), "--dry-run", "--set", "train.preservation=dop", "--set", "train.preservation_weight=0.5"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if "preservation" in line)
    assert "dop: 'sks' -> 'person' in each caption, weight 0.5" in row
    assert "one more forward without gradient" in row and "about 2.3x the step time" in row
    assert "peak memory +0.0 MiB; [data] table 1 has no trigger_word, so its images get no DOP" in row


def _captioned_copies(example_data: Path, folder: Path, prefix: str, caption: str) -> Path:
    """Two of the example images as `<prefix>_00.png`, `<prefix>_01.png` in `folder`, each captioned `caption`."""
    folder.mkdir()
    for index in ("00", "01"):
        (folder / f"{prefix}_{index}.png").write_bytes((example_data / f"img_{index}.png").read_bytes())
        (folder / f"{prefix}_{index}.txt").write_text(caption, encoding="utf-8")
    return folder


def test_images_without_the_trigger_are_left_out_of_dop(tmp_path, example_data):
    """A second [[data]] table without a trigger word: its images have no class caption and weight 0 in DOP's
    loss, their own caption standing in (any embedding would do); the triggered ones weight 1. Checked to fail
    with the mask inverted."""
    from zturbo_train.data.prepare import prepare_dataset

    plain = _captioned_copies(example_data, tmp_path / "plain", "other", "a blue floor")
    raw = {
        "model": {"path": "builtin:tiny", "dtype": "fp32"},
        "data": [
            {"dir": str(example_data), "trigger_word": "sks", "resolution": 64},
            {"dir": str(plain), "resolution": 64},
        ],
        "train": {"preservation": "dop", "batch_size": 8, "output_dir": str(tmp_path / "run")},
    }
    dataset = prepare_dataset(validate_config(raw))
    own = dataset.prompt_embeddings(["a blue floor"])[0]
    preserve = {}
    for position in range(dataset.batches_per_epoch):  # one batch per bucket
        batch = dataset.load_batch(0, position)
        preserve.update(zip([p.name for p in batch.images], batch.preserve or [1.0] * len(batch.images)))
        for text, path in zip(batch.class_text, batch.images):
            assert torch.equal(text, own) == path.name.startswith("other")
    assert preserve == {**{name: 1.0 for name in CLASS_CAPTIONS}, "other_00.png": 0.0, "other_01.png": 0.0}


def test_a_regularisation_set_is_left_out_of_dop_and_keeps_its_loss_weight(tmp_path, example_data):
    """DOP beside a regularisation set (issue 16's items 1 and 2 together): the reg images, which carry no
    trigger, have DOP weight 0 and their table's loss_weight; the triggered images DOP weight 1 and weight 1."""
    from zturbo_train.data.prepare import prepare_dataset

    reg = _captioned_copies(example_data, tmp_path / "reg", "reg", "a person")
    raw = {
        "model": {"path": "builtin:tiny", "dtype": "fp32"},
        "data": [
            {"dir": str(example_data), "trigger_word": "sks", "resolution": 64},
            {"dir": str(reg), "resolution": 64, "regularisation": True, "ratio": 0.25, "loss_weight": 0.5},
        ],
        "train": {"preservation": "dop", "batch_size": 8, "output_dir": str(tmp_path / "run")},
    }
    dataset = prepare_dataset(validate_config(raw))
    seen: dict[str, tuple[float, float]] = {}
    for position in range(dataset.batches_per_epoch):
        batch = dataset.load_batch(0, position)
        weights = batch.weights or [1.0] * len(batch.images)
        preserve = batch.preserve or [1.0] * len(batch.images)
        seen.update({p.name: (w, d) for p, w, d in zip(batch.images, weights, preserve)})
    assert {n: v for n, v in seen.items() if n.startswith("reg")} and all(
        v == ((0.5, 0.0) if n.startswith("reg") else (1.0, 1.0)) for n, v in seen.items()
    ), seen
