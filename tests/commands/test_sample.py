"""`zturbo sample`, judged by diffusers' ZImagePipeline on builtin:tiny (64x64, few steps, CPU, fp32)."""

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from lora.test_formats_network import random_lora  # noqa: E402 - the shared random-LoRA helper
from zturbo_train.cli import app
from zturbo_train.commands.sample import SampleSettings, make_jobs, read_prompts_file, sample
from zturbo_train.errors import ConfigError, DataError, LoraError
from zturbo_train.images import save_png
from zturbo_train.lora.files import LoraSpec, parse_lora_spec
from zturbo_train.lora.formats import write_lora_file
from zturbo_train.memory.offload import choose_offload
from zturbo_train.sampling import encode_texts, generate_latents

runner = CliRunner()
SIZE = dict(width=64, height=64)
STEPS = 3


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def max_diff(a, b) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    from diffusers import ZImagePipeline

    return ZImagePipeline.from_pretrained(tiny_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory, pipe):
    """A kohya-style LoRA with alpha over layers and the noise refiner, strong enough to change the image."""
    loras = random_lora(pipe.transformer, rank=4, alpha=2.0, seed=7, blocks=("layers", "noise_refiner"), scale=0.3)
    return write_lora_file(tmp_path_factory.mktemp("lora") / "style.safetensors", loras, "kohya")


def settings(tmp_path, **kw) -> SampleSettings:
    base = dict(
        prompts=["a red cube"],
        model="builtin:tiny",
        steps=STEPS,
        seed=5,
        out_dir=tmp_path / "out",
        device="cpu",
        dtype="fp32",
        **SIZE,
    )
    base.update(kw)
    return SampleSettings(**base)


# ------------------------------------------------------------------ the loop equals the pipeline


@pytest.mark.parametrize("guidance", [0.0, 2.5])
def test_generate_latents_equals_pipeline(tiny_parts, pipe, guidance):
    prompts, seeds = ["a red cube", "a green sphere in the sky"], [3, 11]
    embeds = encode_texts(tiny_parts.tokenizer, tiny_parts.text_encoder, prompts + ["blurry"], torch.device("cpu"))
    ours = generate_latents(
        tiny_parts.transformer,
        tiny_parts.scheduler,
        embeds[:2],
        seeds=seeds,
        steps=STEPS,
        guidance=guidance,
        negative_embeds=[embeds[2]] * 2 if guidance else None,
        **SIZE,
    )
    theirs = pipe(
        prompt=prompts,
        negative_prompt=["blurry"] * 2 if guidance else None,
        num_inference_steps=STEPS,
        guidance_scale=guidance,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        output_type="latent",
        **SIZE,
    ).images
    # The same fp32 operations in the same order: equal to float rounding (in practice bit-identical).
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_text_embeddings_equal_the_pipeline(tiny_parts, pipe):
    ours = encode_texts(tiny_parts.tokenizer, tiny_parts.text_encoder, ["a red cube", "x"], torch.device("cpu"))
    theirs, _ = pipe.encode_prompt(["a red cube", "x"], device=torch.device("cpu"), do_classifier_free_guidance=False)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


def test_caller_scheduler_is_left_alone(tiny_parts):
    embeds = encode_texts(tiny_parts.tokenizer, tiny_parts.text_encoder, ["a red cube"], torch.device("cpu"))
    scheduler = tiny_parts.scheduler

    def state():
        return dict(scheduler.config), scheduler.step_index, scheduler.begin_index, scheduler.timesteps.tolist()

    before = state()
    generate_latents(tiny_parts.transformer, scheduler, embeds, seeds=[0], steps=2, **SIZE)
    assert state() == before


def test_cfg_without_negative_embeddings_is_refused(tiny_parts):
    embeds = encode_texts(tiny_parts.tokenizer, tiny_parts.text_encoder, ["a red cube"], torch.device("cpu"))
    with pytest.raises(ConfigError, match="needs one negative embedding per image"):
        generate_latents(tiny_parts.transformer, tiny_parts.scheduler, embeds, seeds=[0], guidance=3.0, **SIZE)


@pytest.mark.parametrize("guidance", [0.0, 2.0])
def test_sample_with_loras_equals_diffusers_load_lora_weights(tmp_path, pipe, lora_file, guidance):
    second = random_lora(pipe.transformer, rank=2, seed=9, scale=0.3)
    second_file = write_lora_file(tmp_path / "second.safetensors", second, "diffusers")
    s = settings(
        tmp_path, loras=[LoraSpec(lora_file, 0.7), LoraSpec(second_file, -0.4)], guidance=guidance, negative="blurry"
    )
    ours = Image.open(sample(s)[0])

    pipe.load_lora_weights(str(lora_file), adapter_name="a")
    pipe.load_lora_weights(str(second_file), adapter_name="b")
    pipe.set_adapters(["a", "b"], [0.7, -0.4])
    try:
        theirs = pipe(
            prompt="a red cube",
            negative_prompt="blurry" if guidance else None,
            num_inference_steps=STEPS,
            guidance_scale=guidance,
            generator=torch.Generator().manual_seed(5),
            **SIZE,
        ).images[0]
        pipe.disable_lora()
        base = pipe(
            prompt="a red cube",
            negative_prompt="blurry" if guidance else None,
            num_inference_steps=STEPS,
            guidance_scale=guidance,
            generator=torch.Generator().manual_seed(5),
            **SIZE,
        ).images[0]
    finally:
        pipe.unload_lora_weights()
    assert max_diff(base, theirs) > 10, "the LoRAs must visibly change the image"
    # peft adds each branch inside its layer, we add it in a forward hook: fp32 summation order
    # only (~1e-6), so at most one 8-bit level where a value sits on a rounding boundary.
    assert max_diff(ours, theirs) <= 1


# ------------------------------------------------------------------ files written


def test_png_metadata_names_every_setting(tmp_path, lora_file):
    path = sample(settings(tmp_path, loras=[LoraSpec(lora_file, 0.8)], negative="ignored without cfg"))[0]
    text = Image.open(path).text
    info = json.loads(text["zturbo"])
    assert info["prompt"] == "a red cube" and info["seed"] == 5 and info["steps"] == STEPS
    assert info["guidance"] == 0.0 and info["model"] == "builtin:tiny" and info["width"] == 64
    (lora,) = info["loras"]
    assert lora["name"] == "style.safetensors" and lora["strength"] == 0.8
    assert lora["sha256"] == hashlib.sha256(lora_file.read_bytes()).hexdigest()
    assert text["parameters"].startswith("a red cube\n") and "Seed: 5" in text["parameters"]
    assert "style.safetensors:0.8" in text["parameters"]


def test_images_never_overwrite_earlier_ones(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "00007-keep.png").write_bytes(b"earlier image")
    first = sample(settings(tmp_path, count=2))
    second = sample(settings(tmp_path))
    assert [p.name[:5] for p in first + second] == ["00008", "00009", "00010"]
    assert (out / "00007-keep.png").read_bytes() == b"earlier image"
    assert pixels(Image.open(first[0])).tolist() == pixels(Image.open(second[0])).tolist()  # same seed, same image
    assert first[0].name == "00008-5-a-red-cube.png" and first[1].name.startswith("00009-6-")


def test_a_name_taken_meanwhile_is_skipped(tmp_path, monkeypatch):
    from zturbo_train import images as sample_module

    out = tmp_path / "out"
    out.mkdir()
    taken = out / "00001-x.png"
    taken.write_bytes(b"someone else's")
    answers = iter([1, 2])
    monkeypatch.setattr(sample_module, "next_index", lambda folder: next(answers))
    path = save_png(Image.new("RGB", (8, 8)), out, "x")
    assert path.name == "00002-x.png" and taken.read_bytes() == b"someone else's"
    assert sorted(p.name for p in out.iterdir()) == ["00001-x.png", "00002-x.png"]  # no temp files left


def test_compare_writes_a_grid_of_the_same_seeds_without_and_with(tmp_path, lora_file):
    paths = sample(settings(tmp_path, loras=[LoraSpec(lora_file)], count=2, compare=True, steps=2))
    grid = Image.open(paths[-1])
    assert "compare" in paths[-1].name and len(paths) == 3
    assert grid.size == (2 * 64, 2 * (64 + 14))  # a row without the LoRA above a row with it; a column per seed
    base = Image.open(sample(settings(tmp_path / "base", seed=6, steps=2))[0])
    with_lora = Image.open(paths[1])  # seed 6
    assert max_diff(grid.crop((64, 14, 128, 78)), base) == 0
    assert max_diff(grid.crop((64, 78 + 14, 128, 2 * 78)), with_lora) == 0
    assert max_diff(base, with_lora) > 10
    assert json.loads(grid.text["zturbo"])["seed"] == [5, 6]


def test_batches_and_low_mem_on_cpu_give_the_same_images(tmp_path):
    notes = []
    one = sample(settings(tmp_path / "a", prompts=["a red cube", "a green sphere"]))
    batched = sample(
        settings(tmp_path / "b", prompts=["a red cube", "a green sphere"], batch_size=2, low_mem=True), log=notes.append
    )
    for a, b in zip(one, batched):
        # A batch pads the shorter caption (masked): the same image up to float noise.
        assert max_diff(Image.open(a), Image.open(b)) <= 1
    assert any("--low-mem" in n and "changes nothing" in n for n in notes)


def test_text_encoder_is_freed_after_encoding(tmp_path, monkeypatch):
    import weakref

    from zturbo_train.commands import sample as loader
    from zturbo_train.commands.sample import encode_prompts_once

    encoders, real = [], loader.load_parts

    def spy(*args, **kwargs):
        parts = real(*args, **kwargs)
        encoders.append(weakref.ref(parts.text_encoder))
        return parts

    monkeypatch.setattr(loader, "load_parts", spy)
    embeds = encode_prompts_once(
        settings(tmp_path, prompts=["a", "b", "a"], guidance=1.0, negative="n"), torch.device("cpu"), "none"
    )
    assert list(embeds) == ["a", "b", "n"] and encoders[0]() is None


def test_offload_choice():
    gib = 2**30
    assert choose_offload("cpu", True, 0, 12 * gib) == "none"
    assert choose_offload("cuda", False, 8 * gib, 12 * gib) == "none"
    assert choose_offload("cuda", True, 24 * gib, 12 * gib) == "model"
    assert choose_offload("cuda", True, 12 * gib, 12 * gib) == "sequential"


def test_jobs_use_the_same_seeds_for_every_prompt():
    jobs = make_jobs(["a", "b"], 2, 40)
    assert [(j.prompt, j.seed) for j in jobs] == [("a", 40), ("a", 41), ("b", 40), ("b", 41)]


@pytest.mark.cuda
@pytest.mark.parametrize("low_mem", [False, True])
def test_cuda_sample_runs_and_matches_cpu_closely(tmp_path, lora_file, low_mem):
    cpu = Image.open(sample(settings(tmp_path / "cpu", loras=[LoraSpec(lora_file)]))[0])
    gpu = Image.open(sample(settings(tmp_path / "gpu", loras=[LoraSpec(lora_file)], device="cuda", low_mem=low_mem))[0])
    assert max_diff(cpu, gpu) <= 8  # same noise (CPU generator); GPU kernels round differently


# ------------------------------------------------------------------ bad input


def test_lora_spec_parsing(tmp_path):
    assert parse_lora_spec("a/b.safetensors:0.5") == LoraSpec(tmp_path.__class__("a/b.safetensors"), 0.5)
    assert parse_lora_spec("b.safetensors").strength == 1.0
    assert parse_lora_spec("b.safetensors:-1").strength == -1.0
    odd = tmp_path / "x:y.safetensors"
    odd.write_bytes(b"")
    assert parse_lora_spec(str(odd)).path == odd
    with pytest.raises(ConfigError, match="strength 'abc' is not a number; write PATH:STRENGTH"):
        parse_lora_spec("x.safetensors:abc")
    with pytest.raises(ConfigError, match="not a finite number"):
        parse_lora_spec("x.safetensors:nan")


def test_bad_lora_files_fail_before_the_model_loads(tmp_path):
    with pytest.raises(LoraError, match="does not exist"):
        sample(settings(tmp_path, loras=[LoraSpec(tmp_path / "missing.safetensors")]))
    pickle = tmp_path / "lora.ckpt"
    pickle.write_bytes(b"\x80\x04\x95 pickled")
    with pytest.raises(LoraError, match="not a safetensors file .*pickle"):
        sample(settings(tmp_path, loras=[LoraSpec(pickle)]))


def test_lora_of_another_model_names_its_keys(tmp_path):
    flux = tmp_path / "flux.safetensors"
    save_file(
        {
            "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 3072),
            "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(9216, 4),
        },
        str(flux),
    )
    with pytest.raises(
        LoraError, match="1 of 1 modules this model lacks .*double_blocks_0_img_attn_qkv.*another model"
    ):
        sample(settings(tmp_path, loras=[LoraSpec(flux)]))


def test_partial_match_is_refused_unless_allowed(tmp_path, pipe):
    """A file that fits only in part used to be applied with a warning; now it is an error naming the keys."""
    from zturbo_train.lora.formats import LoraWeights

    loras = random_lora(pipe.transformer, scale=0.01)
    loras["double_blocks.0.img_attn.qkv"] = LoraWeights(torch.zeros(4, 8), torch.zeros(8, 4))
    path = write_lora_file(tmp_path / "partial.safetensors", loras)
    expected = (
        rf"1 of {len(loras)} modules this model lacks \(keys it could not place: "
        r"diffusion_model\.double_blocks\.0\.img_attn\.qkv\.\*\); pass --allow-partial"
    )
    with pytest.raises(LoraError, match=expected):
        sample(settings(tmp_path, loras=[LoraSpec(path)]))
    notes = []
    sample(settings(tmp_path, loras=[LoraSpec(path)], allow_partial=True), log=notes.append)
    assert any(
        f"1 of {len(loras)} modules are not in this model and were skipped (--allow-partial): "
        "diffusion_model.double_blocks.0.img_attn.qkv.*" in n
        for n in notes
    )


def test_prompts_file_problems(tmp_path):
    good = tmp_path / "p.txt"
    good.write_text("# a comment\na red cube\n\n  a green sphere  \n", encoding="utf-8")
    assert read_prompts_file(good) == ["a red cube", "a green sphere"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# only comments\n", encoding="utf-8")
    with pytest.raises(DataError, match="has no prompts; write one prompt per line"):
        read_prompts_file(empty)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    with pytest.raises(DataError, match="is not UTF-8 text .*save it as UTF-8"):
        read_prompts_file(latin)
    with pytest.raises(DataError, match="does not exist"):
        read_prompts_file(tmp_path / "none.txt")


def test_bad_options(tmp_path, lora_file):
    with pytest.raises(ConfigError, match="width 70 is not a multiple of 16; use e.g. 64"):
        sample(settings(tmp_path, width=70))
    with pytest.raises(ConfigError, match="--compare .* add at least one --lora"):
        sample(settings(tmp_path, compare=True))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="--out .*file is a file"):
        sample(settings(tmp_path, out_dir=tmp_path / "file"))
    with pytest.raises(ConfigError, match="no prompt given"):
        sample(settings(tmp_path, prompts=[]))


# ------------------------------------------------------------------ the CLI


def test_cli_sample_help():
    result = runner.invoke(app, ["sample", "--help"])
    assert result.exit_code == 0 and "--lora" in result.output and "zturbo sample --lora" in result.output


def test_cli_sample_writes_and_prints(tmp_path, lora_file):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\n", encoding="utf-8")
    result = runner.invoke(
        app,
        [
            "sample",
            "--model",
            "builtin:tiny",
            "--prompts",
            str(prompts),
            "--lora",
            f"{lora_file}:0.5",
            "--width",
            "64",
            "--height",
            "64",
            "--steps",
            "2",
            "--seed",
            "1",
            "--out",
            str(tmp_path / "o"),
            "--device",
            "cpu",
            "--dtype",
            "fp32",
        ],
    )
    assert result.exit_code == 0, result.output
    written = sorted((tmp_path / "o").glob("*.png"))
    assert len(written) == 1 and f"wrote {written[0]}" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lora", "x.safetensors:abc"], "strength 'abc' is not a number"),
        (["--lora", "missing.safetensors"], "LoRA file missing.safetensors does not exist"),
        (["--width", "100"], "width 100 is not a multiple of 16"),
    ],
)
def test_cli_sample_errors_are_one_line(tmp_path, args, message):
    result = runner.invoke(
        app, ["sample", "--model", "builtin:tiny", "--prompt", "x", "--out", str(tmp_path / "o"), *args]
    )
    assert result.exit_code != 0 and "error:" in result.output and message in result.output
    assert "Traceback" not in result.output


def test_cli_empty_prompts_file(tmp_path):
    empty = tmp_path / "p.txt"
    empty.write_text("")
    result = runner.invoke(app, ["sample", "--model", "builtin:tiny", "--prompts", str(empty)])
    assert result.exit_code == 1 and "has no prompts" in result.output
