"""`builtin:tiny` and `builtin:tiny-adapter`: a tiny, random, seeded Z-Image Turbo.

Built from the real classes (ZImageTransformer2DModel, Qwen3Model, AutoencoderKL,
FlowMatchEulerDiscreteScheduler, a byte-level BPE tokenizer with a Qwen-style chat
template), written once as a real diffusers folder in a cache and then loaded through the
same loader as the real model. This is what the quick start, the tests and the CPU
benchmarks run on, since no model weights can be downloaded there.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..paths import builtin_dir
from ..zimage import QUANT_LEAVES, SCHEDULER

TINY_VERSION = "2"
TINY_NAME = "tiny"
TINY_ADAPTER_NAME = "tiny-adapter"
TINY_ADAPTER_RANK = 4

# Qwen3-style chat template: what ZImagePipeline relies on (user turn, generation prompt,
# the `enable_thinking` switch) in a few lines.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
TINY_TRANSFORMER = dict(
    all_patch_size=(2,),
    all_f_patch_size=(1,),
    in_channels=16,
    dim=64,
    n_layers=2,
    n_refiner_layers=1,
    n_heads=2,
    n_kv_heads=2,
    norm_eps=1e-5,
    qk_norm=True,
    cap_feat_dim=32,
    rope_theta=256.0,
    t_scale=1000.0,
    axes_dims=[8, 12, 12],
    axes_lens=[1536, 512, 512],
)


def tiny_model_dir() -> Path:
    """The builtin:tiny diffusers folder, built on first use (atomically: temp folder + rename)."""
    target = builtin_dir() / f"{TINY_NAME}-v{TINY_VERSION}"
    if (target / "model_index.json").is_file():
        return target
    from ..fileio import temp_dir

    tmp = temp_dir(".tiny-", target.parent)
    try:
        build_tiny_pipeline().save_pretrained(tmp, safe_serialization=True)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race; its folder is identical
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def tiny_adapter_file() -> Path:
    """The builtin:tiny-adapter file, in the real adapter format (diffusion_model. keys, no alpha)."""
    from safetensors.torch import save_file

    target = builtin_dir() / f"{TINY_ADAPTER_NAME}-v{TINY_VERSION}.safetensors"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    save_file(build_tiny_adapter(), str(tmp))
    os.replace(tmp, target)
    return target


def build_tiny_adapter(seed: int = 1, rank: int = TINY_ADAPTER_RANK, scale: float = 0.05) -> dict:
    """Random de-distill adapter over every linear of the tiny transformer's blocks."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    dim, hidden = TINY_TRANSFORMER["dim"], _ffn_hidden(TINY_TRANSFORMER["dim"])
    # (out, in) of each of the block's big linears, in QUANT_LEAVES order: q, k, v, out, w1, w2, w3
    shapes = dict(zip(QUANT_LEAVES, [(dim, dim)] * 4 + [(hidden, dim), (dim, hidden), (hidden, dim)]))
    tensors = {}
    blocks = [f"layers.{i}" for i in range(TINY_TRANSFORMER["n_layers"])]
    blocks += [f"noise_refiner.{i}" for i in range(TINY_TRANSFORMER["n_refiner_layers"])]
    for block in blocks:
        for name, (out_f, in_f) in shapes.items():
            key = f"diffusion_model.{block}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, in_f, generator=gen) * scale
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_f, rank, generator=gen) * scale
    return {k: v.contiguous() for k, v in tensors.items()}


def _ffn_hidden(dim: int) -> int:
    return int(dim / 3 * 8)


def build_tiny_pipeline(seed: int = 0):
    """The tiny ZImagePipeline with seeded random weights (not saved)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(**TINY_TRANSFORMER)
    with torch.no_grad():  # the real model's pad tokens are learned, not zero
        transformer.x_pad_token.normal_(0, 0.02)
        transformer.cap_pad_token.normal_(0, 0.02)
        transformer.all_final_layer["2-1"].linear.weight.normal_(0, TINY_TRANSFORMER["dim"] ** -0.5)
    text_encoder = Qwen3Model(
        Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=TINY_TRANSFORMER["cap_feat_dim"],
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=1024,
            tie_word_embeddings=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        norm_num_groups=4,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 8, 16, 16],
        layers_per_block=1,
        sample_size=64,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    return ZImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer (Qwen2 class) trained on a few sentences, with the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [
        "a photo of a red cube on a blue floor",
        "a green sphere in the sky",
        "user assistant system",
        "a painting of a cat, a dog, a house, a tree",
        "sks style portrait of a person, high quality",
    ]
    tok.train_from_iterator(corpus, trainer)
    fast = Qwen2TokenizerFast(
        tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 1024
    return fast
