"""Z-Image Turbo architecture facts, defined once and imported everywhere.

Each is read from diffusers' Z-Image code (`ZImageTransformer2DModel` in
diffusers/models/transformers/transformer_z_image.py, `ZImagePipeline` in
diffusers/pipelines/z_image/pipeline_z_image.py) and the Turbo repo's config files;
tests build the tiny model from those same classes and check the names against it.
No torch import here: cli.py reads the repo ids at `--help` time.
"""

from __future__ import annotations

# The model and its training adapter on the Hub.
TURBO_REPO = "Tongyi-MAI/Z-Image-Turbo"
ADAPTER_REPO = "ostris/zimage_turbo_training_adapter"
ADAPTER_ALIASES = {
    "v1": f"{ADAPTER_REPO}/zimage_turbo_training_adapter_v1.safetensors",
    "v2": f"{ADAPTER_REPO}/zimage_turbo_training_adapter_v2.safetensors",
}

# Block stacks of the transformer, in the order forward runs them: the refiners see the
# image (noise_refiner) and the caption (context_refiner) alone, `layers` sees both.
REFINER_STACKS = ("noise_refiner", "context_refiner")
BLOCK_STACKS = (*REFINER_STACKS, "layers")

# LoRA target name (as configs and other trainers write it) -> linear's path inside a block.
# adaLN_modulation.0 is missing from context_refiner blocks (they have no modulation).
TARGET_PATHS = {
    "to_q": "attention.to_q",
    "to_k": "attention.to_k",
    "to_v": "attention.to_v",
    "to_out.0": "attention.to_out.0",
    "w1": "feed_forward.w1",
    "w2": "feed_forward.w2",
    "w3": "feed_forward.w3",
    "adaLN_modulation.0": "adaLN_modulation.0",
}
DEFAULT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3"]

# The big linears of a block: what fp8 / nf4 / int8 store compactly (modulation, norms,
# embedders and the final layer stay in the model dtype: they are small and sensitive).
QUANT_LEAVES = tuple(TARGET_PATHS[t] for t in DEFAULT_TARGETS)

# Sequences: image and caption tokens are each padded to a multiple of 32 with learned pad tokens.
SEQ_MULTIPLE = 32
# Latents: the 16-channel FLUX VAE; image sides must be multiples of 16 (VAE factor 8 times patch 2).
LATENT_CHANNELS = 16
SIZE_MULTIPLE = 16

# The Turbo repo's scheduler/scheduler_config.json: FlowMatchEulerDiscreteScheduler, static shift 3.
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
