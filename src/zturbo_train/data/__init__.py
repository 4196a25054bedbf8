"""The dataset: images and captions in, cached latents and text embeddings out, batches of one bucket.

The training loop needs three calls:

    dataset = prepare_dataset(cfg, device)            # scan, cache, free the encoders
    loader = dataset.loader(device, state=saved)      # endless batches, read ahead
    state = loader.state_dict()                       # save beside the LoRA to resume

`encode_prompts` is the one place prompts are encoded (the sampler reuses it).
Importing this package stays light: torch and diffusers load only when used.
"""

from ..paths import default_cache_dir
from .batches import Batch, BatchLoader, Sample, TrainDataset, epoch_batches
from .buckets import Bucket, closest_bucket, fit, make_buckets, resize_crop
from .cache import CacheStats, Encoders, encode_latents, encode_prompts
from .dataset import ImageItem, Problem, Scan, load_rgb, scan_datasets
from .prepare import plan_samples, prepare_dataset, scan_and_plan

__all__ = [
    "Batch",
    "BatchLoader",
    "Bucket",
    "CacheStats",
    "Encoders",
    "ImageItem",
    "Problem",
    "Sample",
    "Scan",
    "TrainDataset",
    "closest_bucket",
    "default_cache_dir",
    "encode_latents",
    "encode_prompts",
    "epoch_batches",
    "fit",
    "load_rgb",
    "make_buckets",
    "plan_samples",
    "prepare_dataset",
    "resize_crop",
    "scan_and_plan",
    "scan_datasets",
]
