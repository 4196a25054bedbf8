"""Offload. Training: block offload for small cards, the transformer blocks live in pinned host
memory and are copied to the GPU just ahead of use, on a side CUDA stream, while LoRA trains
on top. Sampling (`zturbo sample --low-mem`): which of diffusers' CPU offloads fits the card.

Why our own design for training: diffusers' group offloading (`enable_group_offload`) moves
parameters in place (it swaps each `param.data` between host and device), so the trained LoRA's
autograd graph and the optimizer see tensors that move under them; it failed with a LoRA in
training. Here a block's Parameters never move. Each call of a
block gets fresh device copies, put into the block's parameter slots only for the length
of the call and restored afterwards. Autograd keeps whatever it saved (device copies), so
backward is correct no matter what the slots hold later. With full gradient checkpointing
autograd saves nothing of a block's weights between forward and backward: the recompute in
backward calls the block again, which fetches it again. Device memory then holds only the
blocks in flight (the one running, `depth` prefetched, one being freed).

Order, for prefetching: forward calls blocks 0 .. n-1; the checkpoint recompute in backward
calls them n-1 down to the lowest block that needs a gradient (learned from the previous
step); sampling (no grad) wraps from n-1 to 0. Being inside the autograd engine is what
tells backward from forward.

CUDA safety: copies are made on the side stream and recorded with an event; the compute
stream waits on the event before use and `record_stream` marks each copy as used by the
compute stream, so the caching allocator never hands its memory to a new copy before the
compute that reads it has run. On the CPU the same code runs with plain copies and no
streams, which is how the tests check that offloading changes no number.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import Tensor, nn

from ..errors import ModelError
from ..fileio import header_entries
from ..models import transformer_files
from ..zimage import BLOCK_STACKS, QUANT_LEAVES

if TYPE_CHECKING:  # pragma: no cover
    from ..lora.network import LoraNetwork

PREFETCH_DEPTH = 2
OFFLOAD_MARGIN_BYTES = 3 * 2**30  # activations, VAE and LoRAs beside the transformer on the GPU


@dataclass
class _Loaded:
    tensors: list[Tensor]
    ready: Any = None  # torch.cuda.Event on CUDA


@dataclass
class StreamStats:
    """Counters for tests and the bench: a miss is a synchronous load (the copy was not ahead)."""

    loads: int = 0
    hits: int = 0
    misses: int = 0
    backward_calls: int = 0


@dataclass
class _Slot:
    module: nn.Module
    table: str  # "_parameters" or "_buffers"
    name: str

    def get(self) -> Any:
        return getattr(self.module, self.table)[self.name]

    def set(self, value: Any) -> None:
        getattr(self.module, self.table)[self.name] = value


@dataclass
class _Block:
    module: nn.Module
    slots: list[_Slot] = field(default_factory=list)
    homes: list[Tensor] = field(default_factory=list)


class BlockStreamer:
    """Streams `blocks` (called in list order in forward) from host memory to `device`."""

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        device: torch.device | str,
        compute_dtype: torch.dtype,
        fp8_names: Callable[[str], bool] | None = None,
        depth: int = PREFETCH_DEPTH,
        pin: bool = True,
    ):
        self.device = torch.device(device)
        self.compute_dtype = compute_dtype
        self.depth = depth
        self.cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.pin = pin and torch.cuda.is_available()
        self.stats = StreamStats()
        self.cache: dict[int, _Loaded] = {}
        self._floor = 0  # lowest block the last backward recomputed
        self._seen_floor: int | None = None
        self.blocks = [
            self._adopt(index, block, fp8_names or (lambda name: False)) for index, block in enumerate(blocks)
        ]

    # -- set-up
    def _adopt(self, index: int, block: nn.Module, fp8: Callable[[str], bool]) -> _Block:
        """Move the block's tensors to (pinned) host memory, fp8 where asked, and wrap its forward."""
        entry = _Block(block)
        for prefix, module in block.named_modules():
            for table in ("_parameters", "_buffers"):
                for name, tensor in getattr(module, table).items():
                    if tensor is None:
                        continue
                    path = f"{prefix}.{name}" if prefix else name
                    dtype = torch.float8_e4m3fn if fp8(path) else tensor.dtype
                    home = tensor.detach().to("cpu", dtype)
                    tensor.data = home.pin_memory() if self.pin else home
                    entry.slots.append(_Slot(module, table, name))
                    entry.homes.append(tensor.data)
        original = block.forward
        block.forward = functools.partial(self._call, index, original)
        return entry

    def remove(self) -> None:
        """Unwrap the blocks (their weights stay in host memory; move the model to use it again)."""
        for entry in self.blocks:
            entry.module.__dict__.pop("forward", None)
        self.cache.clear()

    # -- the call
    def _call(self, index: int, original: Callable, *args: Any, **kwargs: Any) -> Any:
        entry = self.blocks[index]
        tensors, keep = self._acquire(index)
        saved = [slot.get() for slot in entry.slots]
        try:
            for slot, tensor in zip(entry.slots, tensors):
                slot.set(tensor)
            return original(*args, **kwargs)
        finally:  # also when the checkpoint recompute stops early by raising
            for slot, value in zip(entry.slots, saved):
                slot.set(value)
            if keep:
                self.cache[index] = _Loaded(tensors)

    def _acquire(self, index: int) -> tuple[list[Tensor], bool]:
        backward = torch._C._current_graph_task_id() != -1
        self._track(index, backward)
        loaded = self.cache.pop(index, None)
        if loaded is None:
            self.stats.misses += 1
            loaded = self._load(index)
        else:
            self.stats.hits += 1
        if self.cuda:
            current = torch.cuda.current_stream(self.device)
            if loaded.ready is not None:
                current.wait_event(loaded.ready)
            for tensor in loaded.tensors:
                tensor.record_stream(current)
        upcoming = self.upcoming(index, backward, torch.is_grad_enabled())
        self._prefetch([j for j in upcoming if j != index])
        return loaded.tensors, index in upcoming

    def _track(self, index: int, backward: bool) -> None:
        """Learn how far down backward recomputes, so the next step's prefetch stops there."""
        if backward:
            self.stats.backward_calls += 1
            self._seen_floor = index if self._seen_floor is None else min(self._seen_floor, index)
        elif self._seen_floor is not None:
            self._floor, self._seen_floor = self._seen_floor, None

    def upcoming(self, index: int, backward: bool, grad: bool) -> list[int]:
        """The next `depth` blocks expected after `index` (may include `index` itself when the
        checkpoint recompute of the last block follows its forward)."""
        n = len(self.blocks)
        cycle = list(range(n))
        if backward:
            order = list(range(index - 1, self._floor - 1, -1)) + cycle
        elif grad:
            order = list(range(index + 1, n)) + list(range(n - 1, self._floor - 1, -1)) + cycle
        else:
            order = list(range(index + 1, n)) + cycle
        return list(dict.fromkeys(order))[: self.depth]

    def _prefetch(self, indices: list[int]) -> None:
        for stale in [j for j in self.cache if j not in indices]:
            del self.cache[stale]
        for j in indices:
            if j not in self.cache:
                self.cache[j] = self._load(j)

    def _load(self, index: int) -> _Loaded:
        self.stats.loads += 1
        homes = self.blocks[index].homes
        if not self.cuda:
            return _Loaded([self._upcast(h.to(self.device, copy=True)) for h in homes])
        with torch.cuda.stream(self.copy_stream):
            tensors = [self._upcast(h.to(self.device, non_blocking=True)) for h in homes]
            ready = torch.cuda.Event()
            ready.record(self.copy_stream)
        return _Loaded(tensors, ready)

    def _upcast(self, tensor: Tensor) -> Tensor:
        if tensor.dtype == torch.float8_e4m3fn:
            return tensor.to(self.compute_dtype)
        return tensor


def move_except(model: nn.Module, device: torch.device | str, keep: set[int]) -> None:
    """Move every parameter and buffer of `model` to `device`, except those whose id is in `keep`."""
    for module in model.modules():
        for table in ("_parameters", "_buffers"):
            for tensor in getattr(module, table).values():
                if tensor is not None and id(tensor) not in keep:
                    tensor.data = tensor.data.to(device)


def stream_blocks(
    transformer: nn.Module,
    device: torch.device | str,
    compute_dtype: torch.dtype,
    fp8: bool = False,
    depth: int = PREFETCH_DEPTH,
) -> BlockStreamer:
    """Offload every repeated block of the transformer and put the rest on `device`."""
    blocks = [block for stack in BLOCK_STACKS for block in (getattr(transformer, stack, None) or [])]
    fp8_names = (lambda path: any(path == f"{leaf}.weight" for leaf in QUANT_LEAVES)) if fp8 else None
    streamer = BlockStreamer(blocks, device, compute_dtype, fp8_names, depth)
    kept = {id(t) for block in blocks for t in list(block.parameters()) + list(block.buffers())}
    move_except(transformer, device, kept)
    return streamer


# ------------------------------------------------------------------ sampling: diffusers' CPU offload


def choose_offload(device_type: str, low_mem: bool, gpu_bytes: int, transformer_bytes: int) -> str:
    """`none`, `model` (one whole model on the GPU at a time) or `sequential` (layer by layer, slowest).

    Offload only exists for CUDA; elsewhere `--low-mem` is accepted and changes nothing.
    Model offload needs the transformer plus working room on the GPU; below that, sequential.
    """
    if not low_mem or device_type != "cuda":
        return "none"
    return "model" if gpu_bytes >= transformer_bytes + OFFLOAD_MARGIN_BYTES else "sequential"


def transformer_bytes(model_dir: Path, dtype: torch.dtype) -> int:
    """Size of the transformer in `dtype`, read from the safetensors headers (nothing loaded)."""
    numel = sum(math.prod(shape) for shape, _ in header_entries(transformer_files(model_dir)).values())
    return numel * torch.empty((), dtype=dtype).element_size()


def apply_offload(mode: str, parts, networks: Sequence["LoraNetwork"], device: torch.device) -> None:
    """Put the transformer and VAE on the GPU (mode none) or behind diffusers' CPU offload hooks.

    LoRA branches are small and always live on the GPU: the hooks call them with GPU inputs.
    """
    if mode == "none":
        parts.transformer.to(device)
        parts.vae.to(device)
    else:
        from diffusers import ZImagePipeline

        pipe = ZImagePipeline(
            scheduler=parts.scheduler, vae=parts.vae, text_encoder=None, tokenizer=None, transformer=parts.transformer
        )
        try:
            if mode == "model":
                pipe.enable_model_cpu_offload(device=device)
            else:
                pipe.enable_sequential_cpu_offload(device=device)
        except ImportError as exc:
            raise ModelError(f"--low-mem needs the accelerate package ({exc}); run `pip install accelerate`") from None
    for network in networks:
        network.to(device)
