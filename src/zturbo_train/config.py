"""Settings for every command, validated by pydantic and read from TOML.

Unknown keys are rejected (extra="forbid") with the closest valid key; wrong values name
the key, the value and what is allowed. Relative paths resolve against the folder of the
config file, so a config can be run from anywhere; those given with --set, against the
current folder, as paths typed on a command line do. The field descriptions are the
reference for each key; `zturbo check CONFIG` prints the resolved settings.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import re
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from .errors import ConfigError
from .refs import hub_file, is_builtin, is_repo_id
from .zimage import ADAPTER_ALIASES, BLOCK_STACKS, DEFAULT_TARGETS, SIZE_MULTIPLE, TARGET_PATHS, TURBO_REPO

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TARGET_CHOICES = set(TARGET_PATHS)
DEFAULT_REG_RATIO = 0.5  # a regularisation set's share of each epoch when its table gives no ratio
BLOCK_CHOICES = set(BLOCK_STACKS)
# Names other trainers use for our keys, so "did you mean" points at the right one.
KEY_SYNONYMS = {
    "learning_rate": "lr",
    "max_train_steps": "steps",
    "num_steps": "steps",
    "max_steps": "steps",
    "train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "gradient_accumulation": "grad_accum",
    "network_dim": "rank",
    "network_alpha": "alpha",
    "r": "rank",
    "lora_alpha": "alpha",
    "algo": "type",
    "network_type": "type",
    "lokr_factor": "factor",
    "lokr_full_rank": "full_matrix",
    "full_rank": "full_matrix",
    "output_path": "output_dir",
    "save_every_n_steps": "save_every",
    "sample_every_n_steps": "sample_every",
    "guidance_scale": "guidance",
    "num_inference_steps": "steps",
    "image_dir": "dir",
    "path": "dir",
    "train_data_dir": "dir",
    "caption_extension": "caption_ext",
    "model_path": "path",
    "pretrained_model_name_or_path": "path",
    "grad_clip": "max_grad_norm",
    "optimizer_type": "optimizer",
    "lr_warmup_steps": "warmup_steps",
    "scheduler": "lr_scheduler",
    "loraplus_lr_ratio": "loraplus_ratio",
    "loraplus": "loraplus_ratio",
    "validation_dir": "val_dir",
    "validation_every": "val_every",
    "use_ema": "ema",
    "ema_beta": "ema_decay",
    "ema_update_interval": "ema_every",
    "ema_interval": "ema_every",
    "ema_on_cpu": "ema_device",
    "validation_split": "val_fraction",
    "val_split": "val_fraction",
    "is_reg": "regularisation",
    "is_regularisation_data": "regularisation",
    "is_regularization_data": "regularisation",
    "regularization": "regularisation",
    "reg": "regularisation",
    "prior_loss_weight": "loss_weight",
    "reg_weight": "loss_weight",
    "prior_reg_loss_weight": "loss_weight",
    "reg_ratio": "ratio",
    "regularisation_ratio": "ratio",
    "regularization_ratio": "ratio",
    "probability": "ratio",
    "diff_output_preservation": "preservation",
    "dop": "preservation",
    "diff_output_preservation_class": "preservation_class",
    "class_word": "preservation_class",
    "diff_output_preservation_multiplier": "preservation_weight",
    "dop_weight": "preservation_weight",
}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def resolve_path(value: str | Path, base_dir: Path | None) -> Path:
    """Resolve a user path: `~` expanded, relative paths against the config's folder."""
    path = Path(value).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return path.resolve() if path.is_absolute() else path


def resolve_model_ref(value: str, base_dir: Path | None) -> str:
    """A model or adapter reference: `builtin:...`, a Hub id, an alias, or a local path.

    A string shaped like `owner/name` that is not an existing local path stays a Hub id;
    anything else is a path, resolved against the config folder.
    """
    if is_builtin(value) or value in ("none", *ADAPTER_ALIASES):
        return value
    local = resolve_path(value, base_dir)
    if local.exists():
        return str(local)
    if is_repo_id(value) or hub_file(value) is not None:
        return value
    return str(local)


def _base_dir(info: ValidationInfo) -> Path | None:
    return (info.context or {}).get("base_dir")


class ModelConfig(_Section):
    path: str = Field(
        TURBO_REPO,
        description="Z-Image Turbo: a diffusers folder, a Hub id fetched by `zturbo download`, or builtin:tiny.",
    )
    adapter: str = Field(
        "v2",
        description=(
            "Training adapter: v1, v2, none, builtin:tiny-adapter, a .safetensors file, or owner/repo/file.safetensors."
        ),
    )
    adapter_mode: Literal["merge", "live"] = Field(
        "merge",
        description=(
            "merge: fold the adapter into the weights (fastest). live: keep it as a frozen branch (exact, "
            "works on quantized bases)."
        ),
    )
    adapter_weight: float = Field(
        1.0, ge=0.0, le=4.0, description="Strength the adapter is applied with during training."
    )
    dtype: Literal["bf16", "fp16", "fp32"] = Field(
        "bf16",
        description="Dtype of the frozen base weights. Training takes bf16 or fp32 (fp16 has no gradient scaler).",
    )
    quantize: Literal["auto", "none", "fp8", "nf4", "int8"] = Field(
        "auto",
        description=(
            "Storage of the block linears: none (dtype), fp8 (stored float8, cast per layer for compute), "
            "nf4 or int8 (bitsandbytes); modulation, norms, embedders and the final layer stay in dtype. auto: from "
            "train.memory."
        ),
    )
    offload: Literal["auto", "none", "blocks"] = Field(
        "auto",
        description=(
            "blocks: keep the transformer blocks in pinned host memory and stream each to the GPU ahead of "
            "use (small cards; needs full checkpointing, no compile). auto: from train.memory."
        ),
    )

    @field_validator("path", "adapter")
    @classmethod
    def _resolve(cls, value: str, info: ValidationInfo) -> str:
        return resolve_model_ref(value, _base_dir(info))


class DataConfig(_Section):
    dir: Path = Field(..., description="Folder of images (searched recursively) with same-stem caption files.")
    caption_ext: str = Field("txt", description="Extension of caption files, without the dot.")
    default_caption: str | None = Field(
        None, description="Caption for images without a caption file; unset makes a missing caption an error."
    )
    trigger_word: str = Field("", description="Replaces [trigger] in captions, or is prepended where there is none.")
    caption_dropout: float = Field(
        0.0, ge=0.0, le=1.0, description="Rate at which a caption is replaced by the empty caption."
    )
    resolution: list[int] = Field(
        [1024], description="Training side length(s) in pixels; one size or a list such as [512, 768, 1024]."
    )
    repeats: int = Field(1, ge=1, description="How many times each image appears per epoch.")
    flip: bool = Field(False, description="Also train on horizontally flipped images.")
    strict: bool = Field(False, description="Turn dataset warnings (small images, default captions) into errors.")
    regularisation: bool = Field(
        False,
        description=(
            "A regularisation set: images of the class without the trigger word (captions taken as they are), "
            "mixed into each epoch at `ratio`, so the LoRA keeps the class general."
        ),
    )
    ratio: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        description=(
            f"Regularisation sets only: their share of each epoch's samples; unset: {DEFAULT_REG_RATIO} (one per "
            f"training sample, as kohya's reg images and ai-toolkit's every other step)."
        ),
    )
    loss_weight: float = Field(
        1.0,
        gt=0.0,
        le=100.0,
        description="Multiplies the loss of this table's samples (kohya's prior_loss_weight for a regularisation set).",
    )

    @model_validator(mode="after")
    def _regularisation_keys(self) -> "DataConfig":
        if self.ratio is not None and not self.regularisation:
            raise ValueError(
                f"`ratio` applies to regularisation sets only ({self.dir}); set regularisation = true there, "
                f"or weigh a training set with `repeats`"
            )
        if self.regularisation and self.trigger_word:
            raise ValueError(
                f"a regularisation set ({self.dir}) shows the class without the trigger word, so it takes no "
                f"trigger_word; remove trigger_word = {self.trigger_word!r} from that table"
            )
        if self.regularisation and self.repeats != 1:
            raise ValueError(
                f"a regularisation set's share of each epoch is its `ratio`, not `repeats` ({self.dir}); remove "
                f"repeats = {self.repeats} and set ratio (e.g. 0.5)"
            )
        return self

    @property
    def share(self) -> float:
        """A regularisation set's share of each epoch (its ratio, or the default); 0 for a training set."""
        if not self.regularisation:
            return 0.0
        return self.ratio if self.ratio is not None else DEFAULT_REG_RATIO

    @field_validator("dir")
    @classmethod
    def _resolve_dir(cls, value: Path, info: ValidationInfo) -> Path:
        return resolve_path(value, _base_dir(info))

    @field_validator("resolution", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, int) else value

    @field_validator("resolution")
    @classmethod
    def _multiple_of_16(cls, value: list[int]) -> list[int]:
        if not value:
            raise ValueError("give at least one resolution")
        for side in value:
            if side < 2 * SIZE_MULTIPLE or side % SIZE_MULTIPLE:
                raise ValueError(f"{side} is not allowed; use multiples of 16 of at least 32, e.g. 512 or 1024")
        return sorted(set(value))

    @field_validator("caption_ext")
    @classmethod
    def _no_dot(cls, value: str) -> str:
        return value.lstrip(".")


class LoraConfig(_Section):
    type: Literal["lora", "lokr", "loha"] = Field(
        "lora",
        description=(
            "lora (low-rank pair), lokr (LyCORIS LoKr: Kronecker product) or loha (LyCORIS LoHa: Hadamard "
            "product of two low-rank pairs); saved in the keys ComfyUI loads."
        ),
    )
    rank: int = Field(
        32,
        ge=1,
        le=1024,
        description=(
            "LoRA rank; for lokr the rank of the factored w2 (whole when rank >= half its side, as LyCORIS "
            "does), for loha the rank of each of its two pairs."
        ),
    )
    alpha: float | None = Field(
        None,
        gt=0,
        description=(
            "LoRA alpha; the update is scaled by alpha/rank (lokr: only when a side is factored, else 1). "
            "Unset means alpha = rank."
        ),
    )
    factor: int = Field(
        -1,
        description=(
            "lokr: split each side as factor x (side / factor) when factor divides it, else the most "
            "balanced split with the small part <= factor; -1: the most balanced (LyCORIS' default)."
        ),
    )
    full_matrix: bool = Field(False, description="lokr: keep w2 whole (no low-rank factoring; alpha has no effect).")
    decompose_both: bool = Field(False, description="lokr: factor w1 as well as w2 (at lora.rank).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input during training.")
    targets: list[str] = Field(DEFAULT_TARGETS, description=f"Linear layers to adapt, from {sorted(TARGET_CHOICES)}.")
    blocks: list[str] = Field(["layers"], description=f"Block stacks to adapt, from {sorted(BLOCK_CHOICES)}.")

    @field_validator("targets")
    @classmethod
    def _known_targets(cls, value: list[str]) -> list[str]:
        return _check_choices(value, TARGET_CHOICES)

    @field_validator("blocks")
    @classmethod
    def _known_blocks(cls, value: list[str]) -> list[str]:
        return _check_choices(value, BLOCK_CHOICES)

    @field_validator("factor")
    @classmethod
    def _factor(cls, value: int) -> int:
        if value == 0 or value < -1:
            raise ValueError("give -1 (the most balanced split, LyCORIS' default) or a factor of 1 or more, e.g. 8")
        return value

    @model_validator(mode="after")
    def _lokr_keys_need_lokr(self) -> "LoraConfig":
        """LoKr's keys do nothing for another type: say so instead of training something else than asked."""
        if self.type != "lokr":
            for key, default in (("factor", -1), ("full_matrix", False), ("decompose_both", False)):
                if getattr(self, key) != default:
                    raise ValueError(
                        f'`lora.{key}` = {json.dumps(getattr(self, key))} applies to lora.type = "lokr" only, and '
                        f'lora.type is "{self.type}"; set lora.type = "lokr" or remove lora.{key}'
                    )
        return self

    @property
    def scale_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)


def _check_choices(value: list[str], choices: set[str]) -> list[str]:
    if not value:
        raise ValueError(f"give at least one of {sorted(choices)}")
    bad = [v for v in value if v not in choices]
    if bad:
        raise ValueError(f"{bad[0]!r} is not one of {sorted(choices)}")
    return list(dict.fromkeys(value))


class TrainConfig(_Section):
    steps: int = Field(2000, ge=1, description="Optimizer steps to train.")
    lr: float = Field(1e-4, gt=0, le=1.0, description="Peak learning rate.")
    batch_size: int = Field(1, ge=1, description="Images per step (per GPU).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    seed: int = Field(42, ge=0, description="Seed for init, data order, noise and timesteps.")
    output_dir: Path = Field(Path("output/zturbo-lora"), description="Run folder: LoRAs, previews, metrics, state.")
    name: str = Field("lora", pattern=r"^[\w.-]+$", description="File name stem of the saved LoRA.")
    save_every: int = Field(250, ge=0, description="Save a LoRA and training state every N steps (0: only at the end).")
    keep_last: int = Field(3, ge=1, description="How many intermediate LoRAs and states to keep.")
    log_every: int = Field(
        10,
        ge=1,
        description=(
            "Read the loss back from the device every N steps (one host sync); metrics.jsonl still gets one "
            "line per step."
        ),
    )
    sample_every: int = Field(
        250, ge=0, description="Draw preview images every N steps (0: only at step 0 and the end)."
    )
    optimizer: Literal["adamw", "adamw8bit", "prodigy", "adafactor", "lion", "adamw_schedulefree"] = Field(
        "adamw",
        description=(
            "adamw (torch, fused on GPU), adamw8bit (bitsandbytes), adafactor (transformers), or from the "
            "`optimizers` extra: prodigy (sets its own step size; lr 1), lion (lr 3-10x below AdamW's), "
            "adamw_schedulefree (no decaying schedule; previews and saved LoRAs use its averaged weights)."
        ),
    )
    weight_decay: float = Field(0.0, ge=0.0, description="Weight decay (decoupled, as AdamW's).")
    optimizer_args: dict[str, bool | int | float | str | list[float]] = Field(
        default_factory=dict,
        description=(
            "Extra keyword arguments of the optimizer, e.g. {betas = [0.9, 0.99]} or Prodigy's "
            "{d0 = 1e-4, d_coef = 0.5}; checked against the optimizer before any work."
        ),
    )
    loraplus_ratio: float = Field(
        1.0,
        ge=1.0,
        le=256.0,
        description="LoRA+: the up (B) matrices train at lr x this ratio (the paper suggests 16); 1: off.",
    )
    lr_scheduler: Literal["constant", "linear", "cosine"] = Field("constant", description="Schedule after warm-up.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    max_grad_norm: float = Field(1.0, ge=0.0, description="Gradient clipping norm (0: off).")
    memory: Literal["auto", "high", "24gb", "16gb", "12gb", "8gb"] = Field(
        "auto",
        description=(
            "Memory preset that sets every speed/memory lever left on auto (table in BENCHMARKS.md); auto "
            "picks the fastest whose estimated peak fits the free GPU memory."
        ),
    )
    gradient_checkpointing: Literal["auto", "full", "none", "selective"] = Field(
        "auto",
        description=(
            "Recompute activations in backward to save memory: full, none, or selective (checkpoint_fraction "
            "of the main blocks); true/false mean full/none. auto: from memory."
        ),
    )
    checkpoint_fraction: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description=(
            "Share of the 30 main blocks recomputed under selective checkpointing, spread evenly; unset: the "
            "fewest that fit the memory preset's budget."
        ),
    )
    compile: bool | Literal["auto"] = Field(
        "auto",
        description=(
            "Compile the repeated transformer blocks (torch.compile, one graph for all blocks; first steps "
            "slower). auto: from memory."
        ),
    )
    compile_mode: Literal["default", "max-autotune-no-cudagraphs", "reduce-overhead"] = Field(
        "default", description="torch.compile mode for compile = true (reduce-overhead adds CUDA graphs)."
    )
    attention_backend: Literal[
        "auto",
        "native",
        "sdpa-cudnn",
        "sdpa-flash",
        "sdpa-efficient",
        "sdpa-math",
        "flash-attn",
        "flash-attn-3",
        "sage",
    ] = Field(
        "auto",
        description=(
            "Attention kernel; auto measures the exact ones on the GPU and keeps the fastest (PyTorch SDPA "
            "on the CPU). sage is approximate and never picked for you."
        ),
    )
    timestep_sampling: Literal["uniform", "logit_normal", "weighted"] = Field(
        "weighted",
        description=(
            "How sigmas are drawn: uniform, logit_normal (mean, std), or weighted (the default: uniform "
            "sigmas, the loss weighted toward mid sigmas, as ai-toolkit trains Z-Image Turbo; why in flow.py)."
        ),
    )
    logit_mean: float = Field(0.0, description="Mean of logit_normal timestep sampling.")
    logit_std: float = Field(1.0, gt=0, description="Std of logit_normal timestep sampling.")
    timestep_shift: float = Field(
        1.0, gt=0, description="Static shift applied to sampled sigmas (1: none; >1 favours noisier sigmas)."
    )
    ema: bool = Field(
        False,
        description=(
            "Keep an EMA of the LoRA weights (on ema_device); the saved <name>.safetensors and the "
            "previews use it, <name>-raw.safetensors holds the trained weights."
        ),
    )
    ema_decay: float = Field(
        0.999, gt=0.0, lt=1.0, description="EMA decay per step (0.999: an average over about the last 1000 steps)."
    )
    ema_start: int = Field(
        0, ge=0, description="Steps before the EMA starts averaging (until then it follows the weights)."
    )
    ema_device: Literal["gpu", "cpu"] = Field(
        "gpu",
        description=(
            "Where the EMA lives: gpu (beside the LoRA on the training device; no host sync) or cpu (host memory, "
            "none of the GPU's; each update copies the LoRA to the host, so raise ema_every)."
        ),
    )
    ema_every: int = Field(
        1,
        ge=1,
        description=(
            "Update the EMA every N steps, with decay^N, so it averages over the same steps (cpu: 5-10); a LoRA "
            "saved between updates (e.g. the last step) takes the steps since the last update in."
        ),
    )
    val_dir: Path | None = Field(
        None,
        description=(
            "Folder of held-out images with captions (read as the first training [data] table's settings), never "
            "trained on; their validation loss is logged as val_loss."
        ),
    )
    val_fraction: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description=(
            "Share of the [data] images held out of training for validation (picked by seed, at least one); 0: none."
        ),
    )
    val_every: int = Field(
        100,
        ge=1,
        description=(
            "Compute val_loss every N steps (and at the end) when val_dir or val_fraction gives a held-out set."
        ),
    )

    preservation: Literal["none", "dop"] = Field(
        "none",
        description=(
            "dop: differential output preservation (ai-toolkit's DOP). Each caption with the trigger word "
            "replaced by preservation_class is also run with and without the LoRA, and the LoRA is trained to "
            "leave that prediction as the base model makes it, so the subject does not leak into its class; "
            "about twice the step time. true/false mean dop/none."
        ),
    )
    preservation_class: str = Field(
        "person",
        description=(
            "The class word that replaces data.trigger_word in DOP's captions, e.g. person, woman, dog, style."
        ),
    )
    preservation_weight: float = Field(
        1.0, gt=0.0, le=100.0, description="Weight of DOP's loss beside the training loss (ai-toolkit's default: 1)."
    )

    @field_validator("output_dir", "val_dir")
    @classmethod
    def _resolve_out(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return None if value is None else resolve_path(value, _base_dir(info))

    @field_validator("gradient_checkpointing", mode="before")
    @classmethod
    def _bool_checkpointing(cls, value: Any) -> Any:
        """Older configs say true/false."""
        return {True: "full", False: "none"}.get(value, value) if isinstance(value, bool) else value

    @field_validator("preservation", mode="before")
    @classmethod
    def _bool_preservation(cls, value: Any) -> Any:
        """ai-toolkit's diff_output_preservation is a boolean."""
        return {True: "dop", False: "none"}.get(value, value) if isinstance(value, bool) else value

    @field_validator("preservation_class")
    @classmethod
    def _class_word(cls, value: str) -> str:
        value = " ".join(value.split())
        if not value:
            raise ValueError('is empty; set the word for what the subject is, e.g. train.preservation_class = "person"')
        if "[trigger]" in value:
            raise ValueError('holds [trigger]; set a plain class word, e.g. "person"')
        return value

    @model_validator(mode="before")
    @classmethod
    def _prodigy_lr(cls, data: Any) -> Any:
        """Prodigy's lr multiplies the step size it estimates: 1 unless the config says otherwise."""
        if isinstance(data, dict) and data.get("optimizer") == "prodigy" and "lr" not in data:
            return {**data, "lr": 1.0}
        return data

    @model_validator(mode="after")
    def _optimizer_fits(self) -> "TrainConfig":
        own = sorted({"lr", "weight_decay", "params"} & set(self.optimizer_args))
        if own:
            raise ValueError(
                f"`train.optimizer_args` sets {', '.join(own)}; remove it: train.lr and "
                f"train.weight_decay are their own keys, and the parameters are the LoRA's"
            )
        if self.optimizer == "prodigy" and self.lr < 0.1:
            raise ValueError(
                f"`train.lr` = {self.lr:g} with optimizer prodigy: Prodigy estimates the step size "
                f"itself and lr multiplies it; set train.lr = 1.0 (or leave it unset)"
            )
        if self.optimizer == "prodigy" and self.loraplus_ratio != 1.0:
            raise ValueError(
                "`train.loraplus_ratio` needs one lr per parameter group, which Prodigy does not "
                "take; set train.loraplus_ratio = 1 or another train.optimizer"
            )
        if self.optimizer == "adamw_schedulefree" and self.ema:
            raise ValueError(
                "`train.ema` = true with optimizer adamw_schedulefree, which already returns an average "
                "of its weights; set train.ema = false or another train.optimizer"
            )
        if self.optimizer == "adamw_schedulefree" and self.lr_scheduler != "constant":
            raise ValueError(
                f'`train.lr_scheduler` = "{self.lr_scheduler}" with optimizer adamw_schedulefree: it '
                f'averages the weights instead of decaying the lr; set train.lr_scheduler = "constant" '
                f"(train.warmup_steps still applies)"
            )
        return self


class SampleConfig(_Section):
    prompts: list[str] = Field(default_factory=list, description="Preview prompts drawn during training.")
    steps: int = Field(8, ge=1, le=200, description="Sampling steps (Turbo: 8).")
    guidance: float = Field(0.0, ge=0.0, description="Classifier-free guidance scale (Turbo: 0, no CFG).")
    seed: int = Field(42, ge=0, description="Seed of the first preview; prompt i uses seed + i.")
    width: int = Field(1024, ge=32, multiple_of=16, description="Preview width in pixels (multiple of 16).")
    height: int = Field(1024, ge=32, multiple_of=16, description="Preview height in pixels (multiple of 16).")
    negative: str = Field("", description="Negative prompt (used only when guidance > 0).")


class LogConfig(_Section):
    tensorboard: bool = Field(
        False,
        description="Log metrics, previews and the config to TensorBoard in "
        '<output_dir>/tensorboard (pip install "zturbo-train[tensorboard]").',
    )
    wandb: bool = Field(
        False,
        description="Log metrics, previews and the config to Weights & Biases (pip install "
        '"zturbo-train[wandb]"; log in with `wandb login`, or set WANDB_MODE=offline).',
    )
    project: str = Field("zturbo", min_length=1, description="W&B project.")
    entity: str | None = Field(None, description="W&B entity (team or user); unset: your default.")
    run_name: str | None = Field(None, description="Run name shown in W&B; unset: train.name.")
    images: bool = Field(True, description="Send the preview images to the loggers too.")
    report: bool = Field(
        True, description="Write loss.png, samples/timeline-<n>.png and report.html at every save and at the end."
    )

    @field_validator("tensorboard", "wandb")
    @classmethod
    def _extra_installed(cls, value: bool, info: ValidationInfo) -> bool:
        """A logger that is on needs its package: said at config time, before anything is loaded."""
        package = info.field_name  # the extra, the package and the key share the name
        if value and importlib.util.find_spec(package) is None:
            raise ValueError(
                f"needs the {package} package, which is not installed; "
                f'pip install "zturbo-train[{package}]" or set log.{package} = false'
            )
        return value


class Config(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: list[DataConfig] = Field(default_factory=list, description="One [data] table or several [[data]] tables.")
    lora: LoraConfig = Field(default_factory=LoraConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    log: LogConfig = Field(default_factory=LogConfig)

    @field_validator("data", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _needs_data(self) -> "Config":
        if not self.data:
            raise ValueError("no [data] table; add one with `dir` set to a folder of images with .txt captions")
        if not self.train_data:
            raise ValueError(
                "every [[data]] table is a regularisation set (regularisation = true): there is nothing to train "
                "on; add a [[data]] table of your subject's images (with its trigger_word)"
            )
        share = sum(d.share for d in self.data)
        if share >= 1.0:
            ratios = " + ".join(f"{d.share:g}" for d in self.data if d.regularisation)
            raise ValueError(
                f"the regularisation sets' ratios add up to {ratios} = {share:g}, leaving no share of an epoch to "
                f"the training images; lower them so they add up to less than 1 (e.g. 0.25 each for two sets)"
            )
        return self

    @model_validator(mode="after")
    def _regularisation_apart(self) -> "Config":
        """Folders are searched recursively: a regularisation set inside a training folder (or around one, or the
        same) would train its class images with the trigger word too (or the subject's as the class)."""
        for reg in (d for d in self.data if d.regularisation):
            for train in self.train_data:
                if reg.dir.is_relative_to(train.dir) or train.dir.is_relative_to(reg.dir):
                    where = "is" if reg.dir == train.dir else "holds" if train.dir.is_relative_to(reg.dir) else "is in"
                    raise ValueError(
                        f"the regularisation set {reg.dir} {where} the training folder {train.dir}, and folders are "
                        f"searched recursively, so the same images would be trained both with and without the "
                        f"trigger word; move the regularisation images to a folder of their own beside it"
                    )
        return self

    @model_validator(mode="after")
    def _preservation_has_a_trigger(self) -> "Config":
        """DOP replaces the trigger word by the class word: it needs a trigger, and one that is not the class."""
        if self.train.preservation != "dop":
            return self
        triggers = {d.trigger_word for d in self.data if d.trigger_word}
        if not triggers:
            raise ValueError(
                '`train.preservation` = "dop" needs a trigger word to replace by the class word, and no [data] '
                'table sets one; set data.trigger_word (e.g. "sks") or train.preservation = "none"'
            )
        if self.train.preservation_class in triggers:
            raise ValueError(
                f"`train.preservation_class` = {self.train.preservation_class!r} is the trigger word itself, so "
                f"DOP would hold the subject's own captions to the base model; set the class the subject belongs "
                f'to, e.g. "person"'
            )
        return self

    @model_validator(mode="after")
    def _loraplus_needs_pairs(self) -> "Config":
        """LoRA+ speeds up LoRA's zero-initialised up (B) matrices; LoKr and LoHa have no such pair (LyCORIS' own
        LoRA+ boosts only `lora_up` weights, so it leaves them at one lr too)."""
        if self.lora.type != "lora" and self.train.loraplus_ratio != 1.0:
            raise ValueError(
                f"`train.loraplus_ratio` = {self.train.loraplus_ratio:g} speeds up the up (B) matrices of a LoRA, "
                f'and lora.type "{self.lora.type}" has none; set train.loraplus_ratio = 1 or lora.type = "lora"'
            )
        return self

    @property
    def train_data(self) -> list[DataConfig]:
        """The [[data]] tables trained on (regularisation sets left out)."""
        return [d for d in self.data if not d.regularisation]

    @property
    def val_data(self) -> DataConfig | None:
        """train.val_dir read as a dataset with the first training table's settings (no repeats, flips or dropout)."""
        if self.train.val_dir is None:
            return None
        return self.train_data[0].model_copy(
            update={"dir": self.train.val_dir, "repeats": 1, "flip": False, "caption_dropout": 0.0}
        )


# ---------------------------------------------------------------- loading and errors


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a TOML config, apply `section.key=value` overrides, validate, resolve paths."""
    path = Path(path)
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.toml"))
        hint = (
            f"pass one of its .toml files: {', '.join(found)}"
            if found
            else "it holds no .toml files; pass the path of a .toml file such as configs/quickstart.toml"
        )
        raise ConfigError(f"config {path} is a folder, not a file; {hint}")
    if not path.is_file():
        raise ConfigError(
            f"config file {path} does not exist; pass the path of a .toml file such as configs/quickstart.toml"
        )
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}{_toml_hint(path)}") from None
    for item in overrides:
        apply_override(raw, item, base_dir=Path.cwd())
    return validate_config(raw, base_dir=path.parent.resolve())


def _toml_hint(path: Path) -> str:
    """What most often breaks a config's TOML here: a table written both as [data] and [[data]]."""
    try:
        lines = {line.split("#")[0].strip() for line in path.read_text(encoding="utf-8").splitlines()}
    except (OSError, UnicodeDecodeError):
        return ""
    if "[data]" in lines and "[[data]]" in lines:
        return "; with several data sets write each one as [[data]], the first too (not [data])"
    return ""


def validate_config(raw: dict[str, Any], base_dir: Path | None = None) -> Config:
    """Validate a raw dict (as read from TOML) into a Config, or raise one ConfigError listing every problem."""
    single_data = isinstance(raw.get("data"), dict)
    try:
        return Config.model_validate(raw, context={"base_dir": base_dir})
    except ValidationError as exc:
        lines = [_describe(err, single_data) for err in exc.errors()]
        raise ConfigError(
            "invalid config: " + lines[0] if len(lines) == 1 else "invalid config:\n  " + "\n  ".join(lines)
        ) from None


# Keys that hold paths: relative values given with --set resolve against `base_dir` (the current folder).
PATH_KEYS = {
    ("data", "dir"): resolve_path,
    ("train", "output_dir"): resolve_path,
    ("train", "val_dir"): resolve_path,
    ("model", "path"): resolve_model_ref,
    ("model", "adapter"): resolve_model_ref,
}


def apply_override(raw: dict[str, Any], item: str, base_dir: Path | None = None) -> None:
    """Apply one `--set section.key=value` to the raw TOML dict; the value is parsed as TOML.

    Of several [[data]] tables one is picked by index: `data.0.dir=...` (`data[0].dir` also works,
    as error messages print it); a bare `data.dir` is refused when there are several, not applied to all.
    With `base_dir`, a relative path value (data.dir, train.output_dir, model.path, model.adapter)
    resolves against it, as paths typed on a command line do, not against the config's folder.
    """
    key, sep, text = item.partition("=")
    parts = _INDEX.sub(r".\1", key.strip()).split(".")
    if not sep or len(parts) < 2 or not all(parts):
        raise ConfigError(f"--set {item!r} is not of the form section.key=value, e.g. --set train.lr=2e-4")
    value = parse_value(text.strip())
    node, rest = _override_table(raw, parts, item)
    resolve = PATH_KEYS.get((parts[0], rest[-1])) if len(rest) == 1 else None
    if resolve is not None and base_dir is not None and isinstance(value, str) and value:
        value = str(resolve(value, base_dir))
    for depth, part in enumerate(rest[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(_not_a_table(item, [parts[0], *rest[: depth + 1]]))
    node[rest[-1]] = value


_INDEX = re.compile(r"\[(\d+)\]")


def _override_table(raw: dict[str, Any], parts: list[str], item: str) -> tuple[dict[str, Any], list[str]]:
    """The table `--set` writes into, and the key path left below it; [[data]] tables are picked by index."""
    section, rest = parts[0], parts[1:]
    table = raw.setdefault(section, {})
    if isinstance(table, dict) and rest[0].isdigit():
        table = [table]  # one [data] table: data.0.dir names it too
    if isinstance(table, list):
        if rest[0].isdigit():
            index = int(rest.pop(0))
            if index >= len(table):
                count = f"{len(table)} [[{section}]] table" + ("s" if len(table) > 1 else "")
                raise ConfigError(f"--set {item!r}: the config has {count} (indexes 0 to {len(table) - 1})")
            if not rest:
                raise ConfigError(f"--set {item!r} names a whole table; set one key, e.g. {section}.{index}.dir=...")
            return table[index], rest
        if len(table) > 1:
            raise ConfigError(
                f"--set {item!r} is ambiguous: the config has {len(table)} [[{section}]] tables; "
                f"pick one by index, e.g. --set {section}.0.{'.'.join(rest)}=..."
            )
        if len(table) == 1:
            return table[0], rest
        table = raw[section] = {}
    if not isinstance(table, dict):
        raise ConfigError(_not_a_table(item, [section]))
    return table, rest


def _not_a_table(item: str, path: list[str]) -> str:
    name = ".".join(path)
    return f"--set {item!r}: `{name}` is a value, not a table; set it directly, e.g. --set {name}=..."


def parse_value(text: str) -> Any:
    """Parse an override value as TOML (numbers, booleans, lists, quoted strings), else keep it as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _loc_text(loc: tuple[Any, ...], single_data: bool) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            if not (single_data and out == "data"):
                out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _describe(err: dict[str, Any], single_data: bool) -> str:
    loc = tuple(err["loc"])
    key = _loc_text(loc, single_data)
    if err["type"] == "extra_forbidden":
        parent = _model_at(loc[:-1])
        hint = ""
        if parent is not None:
            synonym = KEY_SYNONYMS.get(str(loc[-1]))
            match = (
                [synonym]
                if synonym in parent.model_fields
                else difflib.get_close_matches(str(loc[-1]), list(parent.model_fields), n=1, cutoff=0.6)
            )
            if match:
                hint = f"; did you mean `{_loc_text(loc[:-1] + (match[0],), single_data)}`?"
            else:
                hint = f"; valid keys here: {', '.join(parent.model_fields)}"
        return f"unknown key `{key}`{hint}"
    if err["type"] == "missing":
        return f"`{key}` is required"
    msg = err["msg"].removeprefix("Value error, ")
    if not loc or isinstance(err.get("input"), dict):  # a table's own check names its keys itself
        return msg
    return f"`{key}` = {err.get('input')!r}: {msg[0].lower() + msg[1:]}"


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns keys at `loc` (to suggest close keys)."""
    model: type[BaseModel] = Config
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        candidates = [annotation, *args]
        nested = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nested is None:
            return None
        model = nested
    return model
