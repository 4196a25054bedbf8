"""`zturbo lab build`: a distilled tiny Z-Image made on the CPU in minutes.

Four stages, each with the real classes and the project's own code:
1. VAE: builtin:tiny's AutoencoderKL fitted briefly to the lab's tiles as a deterministic
   autoencoder (log-variance pinned near zero std), so the latents `zturbo train` caches
   are exactly the modes' latents and decoded previews are recognisable; the fit also
   places the tiles' latents (`fit_vae`): the modes a few noise units apart, in one token.
2. Teacher: the tiny ZImageTransformer2DModel trained from random init with flow.py's
   loss on the old concepts, sigmas uniform (the decision between modes is made at high
   noise, where the `weighted` bell gives almost no weight). Many sampler steps follow its
   curved paths; one or two steps land between modes (blur).
3. Turbo student: reflow. The teacher's many-step samples from known noise give
   (noise, sample) pairs; the student (initialised from the teacher) is trained with the
   same flow loss on those pairs instead of independent noise, which straightens its paths
   so 1-8 steps of the shift-3 sampler reach the teacher's samples. Reflow because it is
   the cheapest distillation on a CPU: the teacher runs once to make the pairs, then
   training is the ordinary flow step (progressive distillation needs teacher calls in
   every step of several rounds, consistency distillation a teacher ODE step per batch
   plus an EMA target). Sigmas uniform, as for the teacher: 1- and 2-step sampling
   evaluate at sigma 1 and 0.75.
4. De-distillation adapter, made the way ostris made the real one: a LoRA on the student
   trained with the ordinary flow-matching loss (independent noise, uniform sigmas) on the
   student's own 8-step generations, at half the user LoRA's learning rate. Saved with the real
   adapter's keys (`diffusion_model.layers.N.<module>.lora_A/B.weight`, no alpha).

The output folder: `student/` and `teacher/` (diffusers folders, usable as model.path),
`adapter.safetensors` (usable as model.adapter), `data/old` and `data/new` (zturbo train
data folders), `modes.safetensors` (the modes' latents and caption embeddings) and
`lab.json` (settings, timings, the VAE round-trip error and the models' measured quality).
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from .concepts import (
    CENTRE,
    NEW_CONCEPT,
    OLD_CONCEPTS,
    PLANE_RADIUS,
    TILE,
    colour_at,
    images_of,
    palette,
    render,
    write_dataset,
)
from .measure import SIDE, averaged, measure, sample_latents

Log = Callable[[str], None]
EVAL_STEPS = (1, 2, 4, 8, 30)
ADAPTER_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3"]


@dataclass
class LabSettings:
    """Iteration counts and rates of the build; `quick()` is the CI-sized variant of the same code."""

    vae_steps: int = 150
    vae_palette: int = 24  # extra tiles of random plane colours, so the fit covers the plane between modes
    teacher_steps: int = 2000
    teacher_lr: float = 2e-3
    pair_steps: int = 30  # sampler steps of the teacher's samples the student is distilled on
    pairs_per_concept: int = 64
    student_steps: int = 800
    student_lr: float = 1e-3
    adapter_rank: int = 16
    adapter_steps: int = 800
    adapter_lr: float = 1e-3  # half the user LoRA's 2e-3
    adapter_samples_per_concept: int = 32
    batch: int = 32
    eval_samples: int = 32
    seed: int = 0

    @classmethod
    def quick(cls) -> "LabSettings":
        return cls(
            vae_steps=50,
            teacher_steps=300,
            pairs_per_concept=24,
            student_steps=200,
            adapter_steps=150,
            adapter_samples_per_concept=16,
            eval_samples=8,
        )


@dataclass
class Lab:
    """A built lab, as read back from its folder."""

    root: Path
    embeds: dict[str, Tensor]
    modes: dict[str, Tensor]
    info: dict

    @property
    def student(self) -> Path:
        return self.root / "student"

    @property
    def teacher(self) -> Path:
        return self.root / "teacher"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter.safetensors"

    @property
    def old_captions(self) -> list[str]:
        return [c.caption for c in OLD_CONCEPTS]

    @property
    def new_caption(self) -> str:
        return NEW_CONCEPT.caption


def build_fingerprint() -> str:
    """sha256 of the lab code that decides what a build makes and measures (lab.json's "quality"), kept in
    lab.json so a lab built by older code is recognisable (the claim tests' committed lab must match)."""
    import hashlib

    here = Path(__file__).parent
    digest = hashlib.sha256()
    for name in ("build.py", "concepts.py", "metric.py", "measure.py", "ideal.py"):
        digest.update((here / name).read_bytes())
    return digest.hexdigest()


def load_lab(root: Path) -> Lab:
    from safetensors.torch import load_file

    from ..errors import DataError

    root = Path(root)
    if not (root / "lab.json").is_file():
        raise DataError(f"{root} is not a built lab (no lab.json); build one with `zturbo lab build {root}`")
    info = json.loads((root / "lab.json").read_text(encoding="utf-8"))
    tensors = load_file(str(root / "modes.safetensors"))
    captions = info["captions"]
    embeds = {c: tensors[f"embed.{i}"] for i, c in enumerate(captions)}
    modes = {c: tensors[f"modes.{i}"] for i, c in enumerate(captions)}
    return Lab(root, embeds, modes, info)


# ------------------------------------------------------------------------------ stage 1: VAE


def _pixels(images) -> Tensor:
    from ..data.cache import image_tensor

    return torch.stack([image_tensor(im) for im in images])


def pin_deterministic(vae) -> None:
    """Encoder log-variance -> -30 (std ~3e-7): the latent is the mean, as the lab's metric assumes."""
    conv = vae.encoder.conv_out
    half = conv.out_channels // 2
    with torch.no_grad():
        conv.weight[half:].zero_()
        conv.bias[half:].fill_(-30.0)


def fit_vae(vae, pixels: Tensor, points: Tensor, steps: int, seed: int, log: Log) -> dict:
    """Autoencoder fit (mean latents) that also places the tiles' latents as the lab needs them.

    `points` are the images' plane coordinates (concepts.py). Besides reconstruction, three pulls: the
    centre tile (mid grey) encodes to a zero latent; everything outside the tile's token stays at zero
    (a tile's colour is one token's business); and latent distances are PLANE_RADIUS times plane
    distances (noise units, L2 over the latent). That puts the modes a few noise units apart, the
    regime where a flow is blurry at few steps (TURBO.md), in one token, as the 2-D prototype's plane.
    """
    cfg = vae.config
    torch.manual_seed(seed)
    pin_deterministic(vae)
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    target = PLANE_RADIUS * torch.cdist(points.double(), points.double()).float()
    centre = int((points.norm(dim=1)).argmin())
    vae.train()
    for step in range(steps):
        mean = vae.encode(pixels).latent_dist.mean
        recon = vae.decode(mean).sample
        scaled = (mean - cfg.shift_factor) * cfg.scaling_factor
        loss = (recon - pixels).square().mean() + _placement_loss(scaled, centre, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        pin_deterministic(vae)
        if (step + 1) % 50 == 0:
            log(f"vae {step + 1}/{steps}: loss {loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        mean = vae.encode(pixels).latent_dist.mean
        recon = vae.decode(mean).sample.clamp(-1, 1)
        rms = float(((recon - pixels) / 2).square().mean().sqrt())  # in [0, 1] pixel units
        scaled = (mean - cfg.shift_factor) * cfg.scaling_factor
        inside = _tile_token(scaled).flatten(1).square().sum(1)
    return {
        "roundtrip_rms": rms,
        "roundtrip_psnr_db": float(-20 * torch.log10(torch.tensor(rms))),
        "latent_rms": float(scaled.square().mean().sqrt()),
        "distance_error": float((torch.cdist(scaled.flatten(1), scaled.flatten(1)) - target).abs().mean()),
        "share_in_tile_token": float((inside / scaled.flatten(1).square().sum(1).clamp_min(1e-12)).mean()),
    }


def _tile_token(latents: Tensor) -> Tensor:
    side = TILE // 8  # latent pixels of one token
    return latents[:, :, :side, :side]


def _placement_loss(scaled: Tensor, centre: int, target: Tensor) -> Tensor:
    outside = scaled.square().sum() - _tile_token(scaled).square().sum()
    flat = scaled.flatten(1)
    distances = (flat[:, None] - flat[None]).square().sum(-1).add(1e-8).sqrt()
    return (
        scaled[centre].square().mean()
        + outside / scaled.numel()
        + ((distances - target).square().mean() / PLANE_RADIUS**2)
    )


# ------------------------------------------------------------------------------ flow training


def train_flow(
    transformer,
    params: Sequence[torch.nn.Parameter],
    batch_fn,
    steps: int,
    lr: float,
    method: str,
    seed: int,
    log: Log,
    what: str,
) -> float:
    """The project's flow-matching step (flow.py) over `batch_fn(generator) -> (x0, noise, caption embeds)`."""
    from ..flow import flow_loss, flow_target, loss_weights, model_time, noisy_latents, predict, sample_sigmas

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    transformer.train()
    smooth = None
    for step in range(steps):
        x0, noise, caps = batch_fn(gen)
        sigmas = sample_sigmas(len(x0), gen, "cpu", method)
        pred = predict(transformer, noisy_latents(x0, noise, sigmas), model_time(sigmas), caps)
        loss = flow_loss(pred, flow_target(x0, noise), loss_weights(sigmas, method))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        value = loss.item()
        smooth = value if smooth is None else 0.95 * smooth + 0.05 * value
        if (step + 1) % 100 == 0:
            log(f"{what} {step + 1}/{steps}: loss {smooth:.4f}")
    transformer.eval()
    return float(smooth or 0.0)


def mode_batches(modes: list[Tensor], embeds: list[Tensor], batch: int):
    """Independent coupling: a random mode of a random concept, fresh noise (the teacher's data)."""

    def draw(gen: torch.Generator):
        concept = torch.randint(len(modes), (batch,), generator=gen).tolist()
        x0 = torch.stack([modes[c][int(torch.randint(len(modes[c]), (1,), generator=gen))] for c in concept])
        return x0, torch.randn(x0.shape, generator=gen), [embeds[c] for c in concept]

    return draw


def pair_batches(noise: Tensor, samples: Tensor, caps: list[Tensor], batch: int):
    """Reflow coupling: the noise a sample was generated from, and that sample."""

    def draw(gen: torch.Generator):
        index = torch.randint(len(noise), (batch,), generator=gen).tolist()
        return samples[index], noise[index], [caps[i] for i in index]

    return draw


def sample_batches(samples: Tensor, caps: list[Tensor], batch: int):
    """Independent coupling on generated samples (the adapter's data: the student's own outputs)."""

    def draw(gen: torch.Generator):
        index = torch.randint(len(samples), (batch,), generator=gen).tolist()
        return samples[index], torch.randn(samples[index].shape, generator=gen), [caps[i] for i in index]

    return draw


# ------------------------------------------------------------------------------ the build


def rebuild_adapter(out: Path, settings: LabSettings | None = None, log: Log = print) -> Lab:
    """Stage 4 again on a built lab (its teacher and student kept): retrain the adapter, re-measure."""
    from diffusers import ZImagePipeline

    s = settings or LabSettings()
    lab = load_lab(out)
    pipe = ZImagePipeline.from_pretrained(str(lab.student), dtype=torch.float32)
    teacher = ZImagePipeline.from_pretrained(str(lab.teacher), dtype=torch.float32).transformer
    clock = time.perf_counter()
    adapter = train_adapter(pipe.transformer, pipe.scheduler, lab.old_captions, lab.embeds, s, log)
    timings = {**lab.info["seconds"], "adapter": time.perf_counter() - clock}
    pipe.transformer.requires_grad_(True)
    return save_lab(
        Path(out), pipe, teacher, pipe.transformer, adapter, lab.modes, lab.embeds, s, timings, lab.info["vae"], log
    )


def build_lab(out: Path, settings: LabSettings | None = None, log: Log = print) -> Lab:
    """Build every part into `out` (created; must not hold a lab already) and return it loaded."""
    from ..sampling import initial_latents
    from ..testing.tiny import build_tiny_pipeline

    s = settings or LabSettings()
    out = Path(out)
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    concepts = (*OLD_CONCEPTS, NEW_CONCEPT)
    pipe = build_tiny_pipeline(seed=s.seed)
    pixels = {c.caption: _pixels(images_of(c)) for c in concepts}
    points = [p for c in (*concepts, CENTRE) for p in c.points] + palette(s.vae_palette, s.seed)
    fit_pixels = _pixels([render(colour_at(p)) for p in points])
    vae_stats = fit_vae(pipe.vae, fit_pixels, torch.tensor(points), s.vae_steps, s.seed, log)
    log(
        f"vae: round-trip RMS {vae_stats['roundtrip_rms']:.4f} ({vae_stats['roundtrip_psnr_db']:.1f} dB), "
        f"latent distances off by {vae_stats['distance_error']:.2f} noise units, "
        f"{vae_stats['share_in_tile_token']:.0%} in the tile's token"
    )
    timings["vae"] = time.perf_counter() - clock
    modes, embeds = encode_lab(pipe, concepts, pixels)
    old = [c.caption for c in OLD_CONCEPTS]

    clock = time.perf_counter()
    teacher = pipe.transformer
    train_flow(
        teacher,
        list(teacher.parameters()),
        mode_batches([modes[c] for c in old], [embeds[c] for c in old], s.batch),
        s.teacher_steps,
        s.teacher_lr,
        "uniform",
        s.seed,
        log,
        "teacher",
    )
    timings["teacher"] = time.perf_counter() - clock

    clock = time.perf_counter()
    seeds = list(range(s.pairs_per_concept)) * len(old)
    caps = [embeds[c] for c in old for _ in range(s.pairs_per_concept)]
    noise = initial_latents(seeds, SIDE, SIDE, torch.device("cpu"))
    samples = sample_latents(teacher, pipe.scheduler, caps, seeds, s.pair_steps)
    student = copy.deepcopy(teacher)
    train_flow(
        student,
        list(student.parameters()),
        pair_batches(noise, samples, caps, s.batch),
        s.student_steps,
        s.student_lr,
        "uniform",
        s.seed + 1,
        log,
        "student",
    )
    timings["student"] = time.perf_counter() - clock

    clock = time.perf_counter()
    adapter = train_adapter(student, pipe.scheduler, old, embeds, s, log)
    timings["adapter"] = time.perf_counter() - clock
    return save_lab(out, pipe, teacher, student, adapter, modes, embeds, s, timings, vae_stats, log)


def encode_lab(pipe, concepts, pixels: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Mode latents (as the training cache encodes them) and caption embeddings (as the pipeline does)."""
    from ..data.cache import encode_latents, encode_prompts

    with torch.no_grad():
        modes = {c.caption: encode_latents(pipe.vae, pixels[c.caption])[0] for c in concepts}
        texts = encode_prompts(pipe.tokenizer, pipe.text_encoder, [c.caption for c in concepts], torch.device("cpu"))
    return modes, {c.caption: e.float() for c, e in zip(concepts, texts)}


def train_adapter(student, scheduler, old: list[str], embeds: dict[str, Tensor], s: LabSettings, log: Log):
    """A LoRA trained with plain flow matching on the student's own 8-step samples, low lr (the adapter recipe)."""
    from ..lora.network import create_lora

    n = s.adapter_samples_per_concept
    seeds = [50_000 + i for i in range(n)] * len(old)
    caps = [embeds[c] for c in old for _ in range(n)]
    samples = sample_latents(student, scheduler, caps, seeds, 8)
    student.requires_grad_(False)
    network = create_lora(student, s.adapter_rank, float(s.adapter_rank), ["layers"], ADAPTER_TARGETS, seed=s.seed + 2)
    train_flow(
        student,
        network.trainable_parameters(),
        sample_batches(samples, caps, s.batch),
        s.adapter_steps,
        s.adapter_lr,
        "uniform",
        s.seed + 2,
        log,
        "adapter",
    )
    loras = network.to_lora_dict()
    network.detach()
    return loras


def model_drift(transformer, scheduler, lab: Lab, n: int) -> dict[str, float]:
    """turbo_drift at 8 steps on the old concepts and on the new one (drift.py, as previews compute it)."""
    from ..drift import DriftProbe
    from .measure import EVAL_SEED

    out = {}
    for part, captions in (("old", lab.old_captions), ("new", [lab.new_caption])):
        probe = DriftProbe()
        sample_latents(
            transformer,
            scheduler,
            [lab.embeds[c] for c in captions for _ in range(n)],
            [EVAL_SEED + i for _ in captions for i in range(n)],
            8,
            observe=probe.observe,
        )
        out[part] = round(probe.value(), 4)
    return out


def adapter_state_dict(loras) -> dict[str, Tensor]:
    """The real adapter's key format: `diffusion_model.<module>.lora_A/B.weight`, no alpha (alpha = rank)."""
    out = {}
    for module, lora in sorted(loras.items()):
        out[f"diffusion_model.{module}.lora_A.weight"] = lora.down.contiguous()
        out[f"diffusion_model.{module}.lora_B.weight"] = lora.up.contiguous()
    return out


def save_lab(
    out: Path, pipe, teacher, student, adapter, modes, embeds, s: LabSettings, timings, vae_stats, log: Log
) -> Lab:
    from diffusers import ZImagePipeline
    from safetensors.torch import save_file

    from ..fileio import atomic_path, write_json

    out.mkdir(parents=True, exist_ok=True)
    for name, transformer in (("student", student), ("teacher", teacher)):
        ZImagePipeline(
            scheduler=pipe.scheduler,
            vae=pipe.vae,
            text_encoder=pipe.text_encoder,
            tokenizer=pipe.tokenizer,
            transformer=transformer,
        ).save_pretrained(out / name, safe_serialization=True)
    with atomic_path(out / "adapter.safetensors") as tmp:
        save_file(adapter_state_dict(adapter), str(tmp), metadata={"format": "pt"})
    captions = list(modes)
    tensors = {f"modes.{i}": modes[c].contiguous() for i, c in enumerate(captions)}
    tensors |= {f"embed.{i}": embeds[c].contiguous() for i, c in enumerate(captions)}
    with atomic_path(out / "modes.safetensors") as tmp:
        save_file(tensors, str(tmp))
    write_dataset(OLD_CONCEPTS, out / "data" / "old")
    write_dataset((NEW_CONCEPT,), out / "data" / "new")
    info = {
        "captions": captions,
        "old": [c.caption for c in OLD_CONCEPTS],
        "new": NEW_CONCEPT.caption,
        "settings": asdict(s),
        "source": build_fingerprint(),
        "seconds": timings,
        "vae": vae_stats,
    }
    write_json(out / "lab.json", info)
    lab = load_lab(out)
    clock = time.perf_counter()
    info["quality"] = quality_report(lab, s.eval_samples, log)
    timings["evaluation"] = time.perf_counter() - clock
    write_json(out / "lab.json", info)
    lab.info = info
    return lab


def quality_report(lab: Lab, n: int, log: Log) -> dict:
    """Teacher, student and student + adapter on the old concepts, and the student on the unseen new one,
    with each one's turbo_drift (8 steps) on the old concepts and on the new one; and the exact field's
    samples (ideal.py: what a perfect teacher would do) as the yardstick for the teacher's blur."""
    from ..lora.formats import read_lora_file
    from ..lora.network import load_lora
    from ..models import load_parts
    from .ideal import ideal_curve

    report = {"ideal": ideal_curve(lab.embeds, lab.modes, lab.old_captions, EVAL_STEPS, n)}
    for name, path in (("teacher", lab.teacher), ("student", lab.student)):
        parts = load_parts(str(path), ["transformer", "scheduler"], dtype="fp32", device="cpu")
        result = measure(
            parts.transformer,
            parts.scheduler,
            lab.embeds,
            lab.modes,
            lab.old_captions + [lab.new_caption],
            EVAL_STEPS,
            n,
        )
        report[name] = averaged(result, lab.old_captions)
        report[f"{name}_new_concept"] = averaged(result, [lab.new_caption])
        report[f"{name}_drift"] = model_drift(parts.transformer, parts.scheduler, lab, n)
        if name == "student":
            load_lora(parts.transformer, read_lora_file(lab.adapter)[0], what="the lab adapter")
            result = measure(parts.transformer, parts.scheduler, lab.embeds, lab.modes, lab.old_captions, EVAL_STEPS, n)
            report["student_adapter"] = averaged(result, lab.old_captions)
            report["student_adapter_drift"] = model_drift(parts.transformer, parts.scheduler, lab, n)
    log(
        "ideal (exact field) blur on old concepts by steps: "
        + " ".join(f"{k}:{v['blur']:.3f}" for k, v in report["ideal"].items())
    )
    for name in ("teacher", "student", "student_adapter"):
        log(f"{name} turbo_drift (8 steps): {report[f'{name}_drift']}")
        blur = " ".join(f"{k}:{v['blur']:.3f}" for k, v in report[name].items())
        log(f"{name} blur on old concepts by steps: {blur}")
    return report
