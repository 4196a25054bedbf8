"""The Turbo lab (TURBO.md): a distilled tiny Z-Image and what user LoRAs do to its few-step quality.

The lab built here is smoke-sized (SMOKE below): every stage of the real build and run, a few
iterations each. It tests the machinery (files, formats, the real trainer, drift rows, the
report); the adapter's claim is tested on the committed full-size lab (test_claims.py).
turbo_drift's own tests are tests/test_drift.py.
"""

from __future__ import annotations

import json

import pytest
import torch

# ------------------------------------------------------------------------------ the metric


def test_metric_scores_hand_placed_samples():
    from zturbo_train.lab.metric import score

    modes = torch.zeros(2, 16, 2, 2)
    modes[1] += 2.0  # RMS distance between the modes: 2
    samples = torch.stack([modes[0], modes[0] + 0.1, (modes[0] + modes[1]) / 2])  # two hits on mode 0, one between
    result = score(samples, modes)
    assert result["precision"] == pytest.approx(2 / 3)
    assert result["coverage"] == pytest.approx(0.5)
    assert result["blur"] == pytest.approx((0 + 0.05 + 0.5) / 3)


def test_metric_judges_within_the_span_of_all_modes_and_reports_the_rest_as_off():
    """A sample on another concept's mode is far from this concept's modes (not at their midpoint, where its
    projection onto this concept's own line would put it); what lies off the plane is `off`, not blur.

    Mutation checked: projecting onto the concept's own modes only scores the first sample 0.5; keeping every
    direction of the span (QR, the first version) counts the lift along the leftover direction as blur."""
    from zturbo_train.lab.metric import score

    rotation = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(0)))[0]

    def point(x: float, y: float, z: float = 0.0, leftover: float = 0.0) -> torch.Tensor:
        """A latent on a plane in general position (a random rotation), `z` off it, `leftover` along a third
        direction too small to count as part of the span (as the VAE fit leaves)."""
        coords = torch.zeros(64)
        coords[0], coords[1], coords[2], coords[3] = x, y, z, leftover
        return (rotation @ coords).view(16, 2, 2)

    mine = torch.stack([point(0, 1), point(0, -1)])  # this concept: two modes 2 apart (L2)
    other = torch.stack([point(4, 0), point(4, 2, leftover=0.05)])  # another concept on the same plane
    span = torch.cat([mine, other])
    scale = 2 / 64**0.5  # the RMS spacing of `mine`
    far = score(point(4, 0)[None], mine, span)
    assert far["blur"] == pytest.approx((17**0.5 / 64**0.5) / scale, rel=1e-3) and far["precision"] == 0.0
    lifted = score(point(0, 1, 3, leftover=3)[None], mine, span)  # on a mode in the plane, lifted off it
    assert lifted["blur"] < 0.05  # the leftover in one mode tilts the fitted plane a little; QR would give 1.5
    assert lifted["off"] == pytest.approx((18**0.5 / 64**0.5) / scale, rel=1e-2)
    with pytest.raises(ValueError, match="at least two modes"):
        score(point(0, 1)[None], mine[:1])


# ------------------------------------------------------------------------------ the lab pipeline, end to end

# A smoke-sized lab: every stage of `zturbo lab build` and `zturbo lab run` through the same code, with a few
# iterations each. It checks the machinery (files, formats, the real trainer, drift rows, the report), not the
# claim: a full build takes ~8 min, so the claim tests (test_claims.py) run on a committed one.
SMOKE = dict(
    vae_steps=2,
    teacher_steps=4,
    pairs_per_concept=2,
    student_steps=4,
    adapter_steps=4,
    adapter_samples_per_concept=2,
    batch=8,
    eval_samples=2,
)


@pytest.fixture(scope="session")
def smoke_lab(tmp_path_factory):
    from zturbo_train.lab.build import LabSettings, build_lab

    return build_lab(tmp_path_factory.mktemp("lab") / "lab", LabSettings(**SMOKE), log=lambda _: None)


def test_lab_folder_is_usable_by_the_ordinary_commands(smoke_lab):
    """student/ and teacher/ load as model.path; adapter.safetensors has the real adapter's keys and loads."""
    from safetensors import safe_open

    from zturbo_train.lora.adapter import TrainingAdapter
    from zturbo_train.models import load_parts

    with safe_open(str(smoke_lab.adapter), framework="pt") as handle:
        keys = list(handle.keys())
    assert keys and all(k.startswith("diffusion_model.layers.") for k in keys)
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)  # no alpha keys
    parts = load_parts(str(smoke_lab.student), ["transformer"], dtype="fp32", device="cpu")
    adapter = TrainingAdapter.load(str(smoke_lab.adapter), parts.transformer)
    assert adapter.summary()["modules"] == len(keys) // 2
    assert len(list((smoke_lab.root / "data" / "new").glob("*.png"))) == 2
    quality = smoke_lab.info["quality"]
    assert set(quality["student"]) == {"1", "2", "4", "8", "30"} and 0 <= quality["student"]["2"]["blur"]
    assert quality["teacher_drift"]["old"] > 0 and quality["student_adapter_drift"]["new"] > 0
    assert quality["ideal"]["1"]["blur"] == pytest.approx(0.5, abs=1e-3)  # a perfect teacher's 1 step: the modes' mean


def test_mode_latents_are_what_the_training_cache_encodes(smoke_lab):
    """The metric's modes are the VAE mean of the data images, which is what `zturbo train` trains on."""
    from PIL import Image

    from zturbo_train.data.cache import encode_latents, image_tensor
    from zturbo_train.models import load_parts

    vae = load_parts(str(smoke_lab.student), ["vae"], dtype="fp32", device="cpu").vae
    image = Image.open(smoke_lab.root / "data" / "new" / "a-grey-tile-2.png").convert("RGB")
    mean, std = encode_latents(vae, image_tensor(image)[None])
    assert torch.allclose(mean[0], smoke_lab.modes[smoke_lab.new_caption][1], atol=1e-5)
    assert float(std.max()) < 1e-5  # deterministic encoder: the cache's mean + std * noise is the mode


def test_lab_runs_train_measure_and_log_drift(smoke_lab):
    """Direct and over-the-adapter runs through train.loop.run: checkpoints measured, turbo_drift in the
    preview rows."""
    from zturbo_train.lab.experiment import RunSettings, run_lab
    from zturbo_train.lab.report import report

    settings = RunSettings(
        strategies=("direct", "merge"), seeds=(1,), steps=4, checkpoints=1, eval_samples=2, preview_seeds=1
    )
    runs = run_lab(smoke_lab.root, settings, log=lambda _: None)["runs"]
    for strategy in ("direct", "merge"):
        result = runs[strategy]["1"]
        assert [p["step"] for p in result["curve"]] == [2, 4]
        assert set(result["final"]["new"]) == {"1", "2", "4", "8", "30"}
        assert [row["step"] for row in result["logged_drift"]] == [2, 4]
        rows = [
            json.loads(line)
            for line in (smoke_lab.root / "runs" / f"{strategy}-seed1" / "metrics.jsonl").read_text().splitlines()
        ]
        assert [r["step"] for r in rows] == [1, 2, 3, 4] and all("loss" in r for r in rows)
        assert rows[1]["turbo_drift_start"] > 0 and rows[1]["turbo_drift"] > 0
    config = (smoke_lab.root / "runs" / "merge-seed1" / "config.toml").read_text()
    assert 'adapter_mode = "merge"' in config and str(smoke_lab.adapter) in config
    text = report(smoke_lab.root, smoke_lab.root / "plots")
    assert "directly on the student" in text and "over the adapter (merge)" in text
    assert (smoke_lab.root / "plots" / "turbo-curves.png").stat().st_size > 0


def test_sample_drift_reports_with_and_without_the_lora(smoke_lab, tmp_path):
    """`zturbo sample --drift`: one line per image and the values in the PNG metadata."""
    from PIL import Image

    from zturbo_train.commands.sample import sample
    from zturbo_train.preflight import LoraSpec, SampleSettings

    lines: list[str] = []
    paths = sample(
        SampleSettings(
            prompts=[smoke_lab.new_caption],
            loras=[LoraSpec(smoke_lab.adapter)],
            model=str(smoke_lab.student),
            steps=4,
            seed=1,
            count=2,
            width=64,
            height=64,
            out_dir=tmp_path,
            device="cpu",
            dtype="fp32",
            drift=True,
        ),
        log=lines.append,
    )
    drift_lines = [line for line in lines if line.startswith("turbo_drift")]
    assert len(drift_lines) == 2 and all("without LoRAs" in line for line in drift_lines)
    info = json.loads(Image.open(paths[0]).text["zturbo"])
    assert info["turbo_drift"] > 0 and info["turbo_drift_without_loras"] > 0


def test_lab_cli_help_and_a_folder_that_is_no_lab(tmp_path):
    from typer.testing import CliRunner

    from zturbo_train.cli import app

    runner = CliRunner()
    for args in (["lab", "--help"], ["lab", "build", "--help"], ["lab", "run", "--help"], ["lab", "report", "--help"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0 and "Usage" in result.output
    result = runner.invoke(app, ["lab", "run", str(tmp_path)])
    assert result.exit_code != 0 and "zturbo lab build" in result.output
    result = runner.invoke(app, ["lab", "report", str(tmp_path)])
    assert result.exit_code != 0 and "zturbo lab run" in result.output
    result = runner.invoke(app, ["lab", "run", str(tmp_path), "--seeds", "1,x"])
    assert result.exit_code == 2 and "--seeds '1,x' must be comma-separated integers" in result.output
    result = runner.invoke(app, ["lab", "run", str(tmp_path), "--strategies", "direct,lora"])
    assert result.exit_code == 2 and "(lora unknown)" in result.output


def test_lab_run_options_default_to_the_settings_and_override_them_with_quick_too():
    from zturbo_train.lab.experiment import RunSettings

    plain = RunSettings.from_options("1,2", "direct,merge", None, None, False)
    assert (plain.steps, plain.lr, plain.seeds, plain.strategies) == (240, 2e-3, (1, 2), ("direct", "merge"))
    quick = RunSettings.from_options("1", "direct", 50, 1e-3, True)
    assert (quick.steps, quick.lr, quick.eval_samples) == (50, 1e-3, RunSettings.quick().eval_samples)
    assert RunSettings.from_options("1", "direct", None, None, True).steps == RunSettings.quick().steps
