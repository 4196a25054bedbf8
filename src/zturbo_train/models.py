"""Load the parts of Z-Image Turbo: a diffusers folder, a downloaded Hub repo, or builtin:tiny.

Each part loads on its own, so training can load the 8 GB text encoder only while it
fills the caption cache. Only safetensors are read; remote code is never trusted.
"""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ContextManager, Iterable

from .errors import ConfigError, ModelError, ModelNotDownloadedError
from .paths import download_dir
from .refs import is_builtin, is_repo_id
from .testing.tiny import tiny_model_dir

PARTS = ("tokenizer", "text_encoder", "transformer", "vae", "scheduler")
PIPELINE_CLASSES = {"ZImagePipeline"}
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
    from transformers import PreTrainedTokenizerBase, Qwen3Model


@dataclass
class ZImageParts:
    """The loaded components; those not asked for stay None."""

    path: Path
    tokenizer: PreTrainedTokenizerBase | None = None
    text_encoder: Qwen3Model | None = None
    transformer: ZImageTransformer2DModel | None = None
    vae: AutoencoderKL | None = None
    scheduler: FlowMatchEulerDiscreteScheduler | None = None
    loaded: list[str] = field(default_factory=list)


def torch_dtype(name: str):
    """`bf16` / `fp16` / `fp32` (or a torch.dtype) as a torch.dtype."""
    import torch

    if isinstance(name, torch.dtype):
        return name
    check_dtype(name)
    return getattr(torch, DTYPES[name])


def check_dtype(name: str) -> None:
    """A dtype name a user typed: one of DTYPES (checked before torch is imported)."""
    if name not in DTYPES:
        raise ModelError(f"--dtype {name!r} is not one of {', '.join(DTYPES)}; use e.g. --dtype bf16")


def resolve_device(name: str = "auto", *, mps: bool = False, flag: str = "--device") -> "torch.device":
    """The one device picker. `auto`: this rank's CUDA GPU (LOCAL_RANK), then Apple MPS where the caller
    supports it (`mps`), then the CPU. A named device that is not there is an error, not a silent fallback."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if mps and getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{flag} {name!r} is not a device; use auto, cpu, cuda, cuda:1 or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{flag} {name} asked for CUDA but torch sees no CUDA GPU; use {flag} cpu or auto")
    return device


def autocast(device: "torch.device", dtype: "torch.dtype | None") -> ContextManager:
    """The one autocast helper: mixed precision in `dtype` on `device`, nothing for fp32 (or None)."""
    import torch

    if dtype is None or dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def transformer_files(model_dir: Path) -> list[Path]:
    """The transformer's safetensors shards (from the index) or its single file."""
    folder = model_dir / "transformer"
    index = folder / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    if (folder / WEIGHTS_NAME).is_file():
        return [folder / WEIGHTS_NAME]
    raise ModelError(
        f"{folder} has no {WEIGHTS_NAME} or {INDEX_NAME}; the download is incomplete, run `zturbo download` again"
    )


def resolve_model_dir(ref: str | Path) -> Path:
    """Turn a model reference into a checked diffusers folder of Z-Image."""
    ref = str(ref)
    if ref == "builtin:tiny":
        return tiny_model_dir()
    if is_builtin(ref):
        raise ModelError(f"unknown builtin model {ref!r}; the builtin model is builtin:tiny")
    local = Path(ref).expanduser()
    if local.exists():
        return check_model_dir(local)
    if is_repo_id(ref):
        return check_model_dir(_find_downloaded(ref))
    raise ModelError(
        f"model folder {local} does not exist; set [model] path to a Z-Image Turbo folder, "
        f"a Hub id fetched with `zturbo download`, or builtin:tiny"
    )


def _find_downloaded(repo_id: str) -> Path:
    ours = download_dir(repo_id)
    if (ours / "model_index.json").is_file():
        return ours
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure here means "not in the local cache"
        raise ModelNotDownloadedError(
            f"model {repo_id} is not downloaded yet; run `zturbo download --model {repo_id}` (it goes to {ours})"
        ) from None


def check_model_dir(path: Path) -> Path:
    """A folder is Z-Image when its model_index.json names a Z-Image pipeline."""
    if not path.is_dir():
        raise ModelError(f"{path} is not a folder; [model] path must be a diffusers folder of Z-Image Turbo")
    index = path / "model_index.json"
    if not index.is_file():
        raise ModelError(
            f"{path} has no model_index.json, so it is not a diffusers model folder; "
            f"point [model] path at the folder that `zturbo download` wrote"
        )
    try:
        name = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (ValueError, UnicodeDecodeError):
        raise ModelError(f"{index} is not valid JSON; download the model again with `zturbo download`") from None
    if name not in PIPELINE_CLASSES:
        raise ModelError(
            f"{path} holds a {name} model, not Z-Image ({', '.join(PIPELINE_CLASSES)}); "
            f"set [model] path to a Z-Image Turbo folder"
        )
    return path


def load_parts(
    ref: str | Path,
    parts: Iterable[str] = PARTS,
    dtype: str = "bf16",
    device: str = "cpu",
    vae_dtype: str | None = None,
) -> ZImageParts:
    """Load the named parts of the model at `ref` with a dtype and device."""
    path = resolve_model_dir(ref)
    out = ZImageParts(path=path)
    for part in parts:
        if part not in PARTS:
            raise ModelError(f"unknown model part {part!r}; parts are {', '.join(PARTS)}")
        folder = path / part
        if not folder.is_dir():
            raise ModelError(f"{path} has no {part}/ folder; the download is incomplete, run `zturbo download` again")
        part_dtype = vae_dtype if part == "vae" and vae_dtype else dtype
        setattr(out, part, _LOADERS[part](folder, torch_dtype(part_dtype), device))
        out.loaded.append(part)
    return out


def _load_tokenizer(folder: Path, dtype, device):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)


def _load_text_encoder(folder: Path, dtype, device):
    from transformers import Qwen3Model

    model = Qwen3Model.from_pretrained(folder, dtype=dtype, use_safetensors=True, trust_remote_code=False)
    return model.to(device).eval().requires_grad_(False)


def _load_transformer(folder: Path, dtype, device):
    from diffusers import ZImageTransformer2DModel

    model = _from_pretrained(ZImageTransformer2DModel, folder, dtype)
    return model.to(device).eval().requires_grad_(False)


def _load_vae(folder: Path, dtype, device):
    from diffusers import AutoencoderKL

    model = _from_pretrained(AutoencoderKL, folder, dtype)
    return model.to(device).eval().requires_grad_(False)


def _from_pretrained(cls, folder: Path, dtype):
    """diffusers >= 0.42 renamed `torch_dtype` to `dtype`; the old name works on every version we support."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        return cls.from_pretrained(folder, torch_dtype=dtype, use_safetensors=True)


def _load_scheduler(folder: Path, dtype, device):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_pretrained(folder)


_LOADERS = {
    "tokenizer": _load_tokenizer,
    "text_encoder": _load_text_encoder,
    "transformer": _load_transformer,
    "vae": _load_vae,
    "scheduler": _load_scheduler,
}


def build_pipeline(parts: ZImageParts):
    """A diffusers ZImagePipeline over already loaded parts (the reference sampler and judge)."""
    from diffusers import ZImagePipeline

    missing = [p for p in PARTS if getattr(parts, p) is None]
    if missing:
        raise ModelError(f"cannot build a pipeline without {', '.join(missing)}; load all parts")
    return ZImagePipeline(**{p: getattr(parts, p) for p in PARTS})
