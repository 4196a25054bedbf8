"""Peak GPU memory of a training step, estimated from parameter counts before anything loads.

Why an estimate: `zturbo train --dry-run` and `memory = "auto"` must say whether a run fits
a card before 12 GB of weights are read. The model is linear in what drives memory:

    peak = weights (dtype, quantization, offload) + LoRA state (rank, optimizer)
         + activations (tokens x batch x blocks that need a backward, checkpointing; DOP's few MiB)
         + one transient weight copy (fp8 upcast, nf4/int8 dequantize)

Activation constants are fitted to peaks measured with a plain diffusers + peft step on an
H200 (random weights of the real shapes, rank 32 on all 34 blocks, batch 1, caption 128
tokens; `reference_workloads` below): 1024 px checkpointed 15.0 GiB, uncheckpointed
50.5 GiB, 512 px checkpointed 13.3 GiB, fp8 storage 9.5 GiB, nf4 6.4 GiB.
tests/memory/test_estimate.py holds the estimate to those within 7 %. Compiled runs measured about 0.5 GiB lower: the
estimate is for the eager step and so errs high.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Iterable

from ..zimage import BLOCK_STACKS, QUANT_LEAVES, REFINER_STACKS, SEQ_MULTIPLE, SIZE_MULTIPLE, TARGET_PATHS

GIB = 2**30
# Fitted constants (see the module docstring). Units: model-dtype vectors of length `dim`
# per token. A block whose activations autograd keeps holds ~39 of them per token; a
# checkpointed block keeps its input (1); the loss, the final layer and the gradient
# flowing back add ~6.5 per token of the main sequence.
BLOCK_VECTORS = 38.95
EXTRA_VECTORS = 6.5
CONSTANT_GIB = 0.02
# Bytes per weight when stored compactly (nf4: 4 bits + double-quantised absmax per 64).
STORAGE_BYTES = {"fp8": 1.0, "nf4": 0.5 + 1 / 64 + 4 / (64 * 256), "int8": 1.0}
# per fp32 LoRA parameter: Prodigy keeps two moments, s and the start point; Adafactor factored second moments
OPTIMIZER_STATE_BYTES = {
    "adamw": 8.0,
    "adamw8bit": 2.0,
    "prodigy": 16.0,
    "adafactor": 0.5,
    "lion": 4.0,
    "adamw_schedulefree": 8.0,
}


@dataclass(frozen=True)
class ModelShape:
    """Parameter counts of a Z-Image transformer, grouped the way memory depends on them."""

    dim: int
    total_params: int
    stack_sizes: dict[str, int]  # blocks per stack
    block_params: dict[str, int]  # parameters of one block of each stack
    quant_params: dict[str, int]  # parameters of one block's QUANT_LEAVES
    largest_linear: int  # parameters of the largest block linear (one transient copy)
    linears: dict[str, dict[str, tuple[int, int]]]  # stack -> leaf path -> (out, in)
    cap_dim: int = 2560  # width of a caption embedding (the text encoder's hidden size)

    @classmethod
    def of(cls, transformer: Any) -> "ModelShape":
        """Count a transformer's parameters (works on the meta device: nothing is allocated)."""
        sizes, block_params, quant_params, linears, largest = {}, {}, {}, {}, 0
        for stack in BLOCK_STACKS:
            blocks = getattr(transformer, stack, None) or []
            sizes[stack] = len(blocks)
            if not blocks:
                block_params[stack] = quant_params[stack] = 0
                linears[stack] = {}
                continue
            block = blocks[0]
            block_params[stack] = sum(p.numel() for p in block.parameters())
            leaves = {
                name: (m.out_features, m.in_features)
                for name, m in block.named_modules()
                if hasattr(m, "in_features") and hasattr(m, "out_features")
            }
            linears[stack] = leaves
            quant = [leaves[name] for name in QUANT_LEAVES if name in leaves]
            quant_params[stack] = sum(o * i for o, i in quant)
            largest = max([largest] + [o * i for o, i in quant])
        total = sum(p.numel() for p in transformer.parameters())
        config = transformer.config
        return cls(
            int(config.dim), total, sizes, block_params, quant_params, largest, linears, int(config.cap_feat_dim)
        )

    @property
    def blocks_params(self) -> int:
        return sum(self.stack_sizes[s] * self.block_params[s] for s in BLOCK_STACKS)

    @property
    def quantized_params(self) -> int:
        return sum(self.stack_sizes[s] * self.quant_params[s] for s in BLOCK_STACKS)

    @property
    def max_block_params(self) -> int:
        return max(self.block_params.values())


def shape_from_config(config: dict[str, Any]) -> ModelShape:
    """The shape of a ZImageTransformer2DModel config, counted on the meta device."""
    import torch
    from diffusers import ZImageTransformer2DModel

    with torch.device("meta"):
        model = ZImageTransformer2DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    return ModelShape.of(model)


@dataclass(frozen=True)
class Workload:
    """What one training step processes."""

    resolution: int
    batch: int = 1
    rank: int = 32
    targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3")
    lora_blocks: tuple[str, ...] = ("layers",)
    optimizer: str = "adamw"
    network: str = "lora"  # lora.type; lokr's shape options below
    factor: int = -1
    full_matrix: bool = False
    decompose_both: bool = False
    ema: bool = False  # train.ema on the GPU: one more fp32 copy of the LoRA (on the host: none)
    preservation: bool = False  # train.preservation = "dop": two more forwards per micro-batch
    caption_tokens: int = 128
    dtype_bytes: int = 2  # the model dtype: bf16/fp16 2, fp32 4

    def tokens(self) -> dict[str, int]:
        """Sequence length each stack sees: image, caption, or both (each padded to 32)."""
        image = _pad((self.resolution // SIZE_MULTIPLE) ** 2)  # one token per 16x16 pixels
        caption = _pad(self.caption_tokens)
        return {"noise_refiner": image, "context_refiner": caption, "layers": image + caption}


def network_of(lora: Any) -> dict[str, Any]:
    """The Workload fields a [lora] table's network type sets."""
    return {
        "network": lora.type,
        "factor": lora.factor,
        "full_matrix": lora.full_matrix,
        "decompose_both": lora.decompose_both,
    }


def _pad(n: int) -> int:
    return -(-n // SEQ_MULTIPLE) * SEQ_MULTIPLE


@dataclass(frozen=True)
class Estimate:
    """Estimated peak GPU memory of a training step, in GiB, by part."""

    weights: float
    lora: float
    activations: float
    transient: float
    host: float  # pinned host memory the offloaded blocks need (not GPU)

    @property
    def total(self) -> float:
        return self.weights + self.lora + self.activations + self.transient


def spread(n: int, count: int) -> list[int]:
    """`count` of `n` indices spread evenly (the blocks selective checkpointing recomputes)."""
    count = max(0, min(n, count))
    return sorted({math.floor(i * n / count) for i in range(count)}) if count else []


def checkpointed_layers(n_layers: int, checkpointing: str, fraction: float) -> set[int]:
    """Indices of `layers` blocks that are recomputed; refiners are always checkpointed when any is."""
    if checkpointing == "full":
        return set(range(n_layers))
    if checkpointing == "selective":
        return set(spread(n_layers, round(fraction * n_layers)))
    return set()


def lora_params(shape: ModelShape, work: Workload) -> int:
    """Trainable parameters: rank x (in + out) per adapted linear for LoRA, twice that for LoHa, LoKr's factors."""
    total = 0
    for stack in work.lora_blocks:
        per_block = sum(_branch(work, o, i)[0] for o, i in _adapted(shape, work, stack))
        total += per_block * shape.stack_sizes.get(stack, 0)
    return total


def _adapted(shape: ModelShape, work: Workload, stack: str) -> list[tuple[int, int]]:
    """(out, in) of each linear the network adapts in one block of `stack`."""
    leaves = shape.linears.get(stack, {})
    return [leaves[p] for t in work.targets if (p := TARGET_PATHS[t]) in leaves]


def _branch(work: Workload, out_features: int, in_features: int) -> tuple[int, int, int]:
    """One adapted linear's (parameters, values kept per token, values kept per block) for backward, beyond what
    a rank-32 LoRA keeps (the fitted constants include that). Measured with saved_tensors_hooks on the layers
    (tests/lora/test_factored.py): LoKr keeps its reshaped (in_m x out_k) intermediate (+ in_m x rank when w2 is
    factored); LoHa its rank^2-wide intermediate and its two Khatri-Rao factors."""
    from ..lora.factored import lokr_shapes

    if work.network == "lokr":
        shapes = lokr_shapes(out_features, in_features, work.rank, work.factor, work.full_matrix, work.decompose_both)
        in_m = shapes["lokr_w1"][1] if "lokr_w1" in shapes else shapes["lokr_w1_b"][1]
        out_k = shapes["lokr_w2"][0] if "lokr_w2" in shapes else shapes["lokr_w2_a"][0]
        per_token = in_m * out_k + (0 if "lokr_w2" in shapes else in_m * work.rank)
        return sum(a * b for a, b in shapes.values()), per_token, 0
    if work.network == "loha":
        square = work.rank * work.rank
        return 2 * work.rank * (out_features + in_features), square, square * (out_features + in_features)
    return work.rank * (out_features + in_features), 0, 0


def branch_activations(shape: ModelShape, work: Workload, stack: str) -> tuple[float, float]:
    """(vectors of `dim` per token, bytes) one block of `stack` keeps for its LoKr / LoHa branches (0 for LoRA)."""
    kept = [_branch(work, o, i) for o, i in _adapted(shape, work, stack)] if stack in work.lora_blocks else []
    per_token = sum(k[1] for k in kept) / shape.dim
    return per_token, sum(k[2] for k in kept) * work.dtype_bytes


def adapted_linears(shape: ModelShape, blocks: Iterable[str], targets: Iterable[str]) -> dict[str, tuple[int, int]]:
    """(out, in) of each kind of linear a LoRA adapts, as `stack.*.leaf` (every block of a stack is alike)."""
    return {
        f"{stack}.*.{TARGET_PATHS[t]}": shape.linears[stack][TARGET_PATHS[t]]
        for stack in blocks
        for t in targets
        if TARGET_PATHS[t] in shape.linears.get(stack, {}) and shape.stack_sizes.get(stack, 0)
    }


def rank_warning(rank: int, linears: dict[str, tuple[int, int]]) -> str | None:
    """Why a rank above a layer's width is wasted: up @ down has rank at most min(in, out), so the extra
    rank adds parameters, memory and time but no capacity. None when the rank fits every layer.
    `linears`: module name -> (out, in); block indices are folded (`layers.3.x` counts as `layers.*.x`)."""
    kinds = {re.sub(r"\.\d+\.", ".*.", name): size for name, size in linears.items()}
    narrow = {name: size for name, size in kinds.items() if rank > min(size)}
    if not narrow:
        return None
    name = min(narrow, key=lambda n: min(narrow[n]))
    width = min(narrow[name])
    return (
        f"lora.rank {rank} is above the width of {len(narrow)} of the {len(kinds)} kinds of adapted layer "
        f"(narrowest: {name}, {narrow[name][0]}x{narrow[name][1]}); a LoRA cannot use rank beyond min(in, out), "
        f"so the extra rank adds parameters but no capacity; set lora.rank to {width} or less"
    )


def activation_bytes(shape: ModelShape, work: Workload, checkpointing: str, fraction: float) -> float:
    """Bytes autograd keeps between forward and backward, plus one recomputed block."""
    vector = shape.dim * work.dtype_bytes
    tokens = work.tokens()
    grad_stacks = ["layers"] + [s for s in REFINER_STACKS if s in work.lora_blocks]
    kept = recompute = 0.0
    ckpt_layers = checkpointed_layers(shape.stack_sizes["layers"], checkpointing, fraction)
    for stack in grad_stacks:
        branch_vectors, branch_bytes = branch_activations(shape, work, stack)
        block = tokens[stack] * (BLOCK_VECTORS + branch_vectors) * vector + branch_bytes / work.batch
        for index in range(shape.stack_sizes.get(stack, 0)):
            checkpointed = index in ckpt_layers if stack == "layers" else checkpointing != "none"
            if checkpointed:
                kept += tokens[stack] * vector
                recompute = max(recompute, block)
            else:
                kept += block
    extra = tokens["layers"] * EXTRA_VECTORS * vector
    return work.batch * (kept + recompute + extra) + CONSTANT_GIB * GIB


def preservation_bytes(shape: ModelShape, work: Workload) -> float:
    """What DOP (train/preservation.py) adds to the peak: the class captions' embeddings on the device and the
    base prediction its loss holds, in the model dtype.

    Its two forwards add no activations to the peak: the LoRA-off one runs without gradient after the
    training loss's backward freed that graph (one block's intermediates at a time, less than a block
    recomputed under checkpointing), and its forward with gradient keeps what the training forward kept,
    freed by its own backward. So DOP costs time (BENCHMARKS.md), not memory: about 1 MiB at 1024 px.
    """
    if not work.preservation:
        return 0.0
    latent = 16 * (work.resolution // 8) ** 2
    return work.batch * (latent + _pad(work.caption_tokens) * shape.cap_dim) * work.dtype_bytes


def weight_bytes(
    shape: ModelShape, work: Workload, quantize: str, offload: str, prefetch: int = 2
) -> tuple[float, float, float]:
    """(GPU-resident weight bytes, transient bytes, pinned host bytes)."""
    db = work.dtype_bytes
    if offload == "blocks":
        storage = STORAGE_BYTES["fp8"] if quantize == "fp8" else db
        streamed_storage = shape.quantized_params * storage + (shape.blocks_params - shape.quantized_params) * db
        in_flight = (prefetch + 2) * shape.max_block_params * db
        return (shape.total_params - shape.blocks_params) * db + in_flight, 0.0, streamed_storage
    if quantize == "none":
        return shape.total_params * db, 0.0, 0.0
    compact = shape.quantized_params * STORAGE_BYTES[quantize]
    rest = (shape.total_params - shape.quantized_params) * db
    return compact + rest, shape.largest_linear * db, 0.0


def estimate(
    shape: ModelShape,
    work: Workload,
    *,
    checkpointing: str = "full",
    fraction: float = 1.0,
    quantize: str = "none",
    offload: str = "none",
) -> Estimate:
    """Estimated peak GPU memory of one training step with these levers."""
    weights, transient, host = weight_bytes(shape, work, quantize, offload)
    if quantize == "fp8" and offload == "none":
        # diffusers' layerwise casting upcasts a layer per call; autograd keeps the bf16 copy
        # of every block it does not recompute, so only checkpointed blocks save memory.
        kept = shape.stack_sizes["layers"] - len(
            checkpointed_layers(shape.stack_sizes["layers"], checkpointing, fraction)
        )
        transient += kept * shape.quant_params["layers"] * work.dtype_bytes
    lora = lora_params(shape, work) * (8 + OPTIMIZER_STATE_BYTES[work.optimizer] + 4 * work.ema)
    acts = activation_bytes(shape, work, checkpointing, fraction) + preservation_bytes(shape, work)
    return Estimate(weights / GIB, lora / GIB, acts / GIB, transient / GIB, host / GIB)


def fit_checkpointing(shape: ModelShape, work: Workload, budget_gib: float, **levers: str) -> float | None:
    """The smallest share of `layers` blocks to checkpoint so the estimate fits `budget_gib`
    (None when even full checkpointing does not fit)."""
    n = shape.stack_sizes["layers"]
    for count in range(n + 1):
        fraction = count / n if n else 1.0
        if estimate(shape, work, checkpointing="selective", fraction=fraction, **levers).total <= budget_gib:
            return fraction
    return None


def reference_workloads() -> Iterable[tuple[str, Workload, dict[str, Any], float]]:
    """The measured peaks (name, workload, levers, GiB) the constants are fitted to (see the module docstring)."""
    every = ("layers", *REFINER_STACKS)
    w1024 = Workload(1024, lora_blocks=every)
    yield "1024 ckpt", w1024, {"checkpointing": "full"}, 15.0
    yield "1024 none", w1024, {"checkpointing": "none"}, 50.5
    yield "512 ckpt", Workload(512, lora_blocks=every), {"checkpointing": "full"}, 13.3
    yield "1024 fp8", w1024, {"checkpointing": "full", "quantize": "fp8"}, 9.5
    yield "1024 nf4", w1024, {"checkpointing": "full", "quantize": "nf4"}, 6.4


def network_warning(lora: Any, linears: dict[str, tuple[int, int]], adapted: Iterable[str]) -> str | None:
    """What a [lora] table's rank does not do on these layers: rank above a layer's width (LoRA, LoHa), or a LoKr
    rank so large that w2 stays whole (as LyCORIS decides; alpha then has no effect there)."""
    from ..lora.factored import lokr_shapes

    sizes = {name: linears[name] for name in adapted}
    if lora.type != "lokr":
        return rank_warning(lora.rank, sizes)
    if lora.full_matrix:
        return None
    kinds = {re.sub(r"\.\d+\.", ".*.", name): size for name, size in sizes.items()}
    whole = sorted(k for k, (o, i) in kinds.items() if "lokr_w2" in lokr_shapes(o, i, lora.rank, lora.factor))
    if not whole:
        return None
    factor = _factoring_factor(list(kinds.values()), lora.rank)
    fix = f"lora.factor = {factor} (a smaller w1, so a larger w2)" if factor else "a smaller lora.rank"
    return (
        f"lora.rank {lora.rank} is at least half the side of LoKr's w2 in {len(whole)} of the {len(kinds)} kinds of "
        f"adapted layer (e.g. {whole[0]}), so w2 is kept whole there and alpha has no effect, as LyCORIS does; "
        f"set lora.full_matrix = true to say so, or {fix} to factor it"
    )


def _factoring_factor(sizes: list[tuple[int, int]], rank: int) -> int | None:
    """The largest lora.factor, up to the widest balanced split, that factors w2 at `rank` in all these (out, in)
    layers (None: only 1 would, which leaves w1 a scalar: a plain LoRA).

    A factor bounds w1's side, so w2 grows; one above the balanced split changes nothing unless it divides the
    side (then it acts as side / factor), so "a larger factor" is no advice: the message names one."""
    from ..lora.factored import factorization, lokr_shapes

    balanced = max(factorization(side)[0] for size in sizes for side in size)
    divisors = {d for size in sizes for side in size for d in range(2, balanced + 1) if side % d == 0}
    for factor in sorted(divisors, reverse=True):  # a divisor splits as named (3 on a 64-wide side acts as 2)
        if all("lokr_w2" not in lokr_shapes(o, i, rank, factor) for o, i in sizes):
            return factor
    return None
