"""LoRA on the Z-Image transformer through forward hooks.

Why our own module and not peft: peft wraps each linear and renames its weight
(`to_q.weight` -> `to_q.base_layer.weight`), which breaks the base names that merging,
quantization and checkpoints rely on. A hook adds `scale * up(down(x))` to a linear's
output and leaves the model untouched, so several LoRAs (the live training adapter, the
trained LoRA, LoRAs loaded for sampling) stack, switch and scale independently, and
detaching one restores the exact base model. The LoRA weights are fp32 over a bf16 (or
quantized) base; under autocast the matmuls run in the autocast dtype. A trained network's
layers are LoraLayer, or with `lora.type` LoKr / LoHa the layers of lora/factored.py; every kind
names its trained tensors (`trained()`) and gives its file form (`to_update()`), so saving,
resume and EMA treat them alike.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LoraError
from ..zimage import TARGET_PATHS
from .factored import new_loha, new_lokr
from .formats import LoraDict, LoraWeights, bias_modules, linear_shapes, require_fit


def target_modules(transformer: nn.Module, blocks: Iterable[str], targets: Iterable[str]) -> list[str]:
    """Module paths for the chosen block stacks and leaf names (modules a block lacks are skipped,
    e.g. adaLN in the context refiner, which has no modulation)."""
    shapes = linear_shapes(transformer)
    names = []
    for block in blocks:
        stack = getattr(transformer, block, None)
        if stack is None:
            raise LoraError(f"the transformer has no {block!r} blocks")
        for index in range(len(stack)):
            names += [
                f"{block}.{index}.{TARGET_PATHS[t]}" for t in targets if f"{block}.{index}.{TARGET_PATHS[t]}" in shapes
            ]
    if not names:
        raise LoraError(f"no linear layers match blocks {list(blocks)} and targets {list(targets)}")
    return names


class LoraLayer(nn.Module):
    """The low-rank branch of one linear: scale * up(down(dropout(x))) (+ a bias delta, when the file has one)."""

    def __init__(
        self, down: torch.Tensor, up: torch.Tensor, scale: float, dropout: float = 0.0, bias: torch.Tensor | None = None
    ):
        super().__init__()
        self.down = nn.Parameter(down)
        self.up = nn.Parameter(up)
        self.scale = scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    kind = "lora"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.down.dtype)
        out = F.linear(F.linear(self.dropout(x), self.down), self.up)
        out = out * self.scale if self.scale != 1.0 else out  # alpha = rank: no multiply kernel (exact)
        return out if self.bias is None else out + self.bias

    def trained(self) -> dict[str, nn.Parameter]:
        """The trained matrices by part name (what the training state saves)."""
        return {"down": self.down, "up": self.up}

    def to_update(self, alpha: float | None) -> LoraWeights:
        """Detached fp32 CPU copies in the converter's internal form."""
        return LoraWeights(
            down=self.down.detach().float().cpu().clone(), up=self.up.detach().float().cpu().clone(), alpha=alpha
        )


class DeltaLayer(nn.Module):
    """A dense update of one linear (a `.diff` patch, or LoKr / LoHa expanded once): x @ dW.T (+ d bias).

    Frozen, held in the model's dtype: it costs the size of the linear it patches, so a
    LoKr file on every layer doubles the transformer's memory while it is attached; merge
    such a file into the model (`zturbo merge --out`) to pay nothing at sampling time.
    """

    def __init__(self, weight: torch.Tensor | None, bias: torch.Tensor | None):
        super().__init__()
        self.weight = None if weight is None else nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            return self.bias
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias)


class LoraNetwork(nn.Module):
    """A set of LoRA layers attached to a transformer by forward hooks.

    `multiplier` scales the whole network (strength); `enabled` switches it off without
    detaching (used for the live adapter and before/after comparisons).
    """

    def __init__(self, layers: dict[str, nn.Module], alphas: dict[str, float | None], multiplier: float = 1.0):
        super().__init__()
        self.names = list(layers)
        self.layers = nn.ModuleList(layers.values())
        self.alphas = alphas
        self.multiplier = multiplier
        self.enabled = True
        self._handles: list = []

    # -- attaching
    def attach(self, transformer: nn.Module) -> "LoraNetwork":
        """Hook every layer onto its linear; the model's own weights stay as they are."""
        if self._handles:
            raise LoraError("this LoRA is already attached; detach it first")
        modules = dict(transformer.named_modules())
        for name, layer in zip(self.names, self.layers):
            self._handles.append(modules[name].register_forward_hook(self._hook(layer)))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def _hook(self, layer: nn.Module):
        def add_branch(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            if not self.enabled or self.multiplier == 0.0:
                return output
            delta = layer(args[0])
            if self.multiplier != 1.0:
                delta = delta * self.multiplier
            return output + delta.to(output.dtype)

        return add_branch

    # -- weights
    def to_lora_dict(self) -> LoraDict:
        """The trained weights in the converter's internal form (detached fp32 copies on CPU)."""
        return {name: layer.to_update(self.alphas[name]) for name, layer in zip(self.names, self.layers)}

    def load_lora_dict(self, loras: LoraDict) -> None:
        """Copy weights in place (resume), keeping the parameters the optimizer holds."""
        self.load_parts({name: _parts(update) for name, update in loras.items()})

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """`module.part` -> the trained tensor (down/up for LoRA, the file keys for LoKr / LoHa), for the state."""
        return {
            f"{name}.{part}": tensor.detach()
            for name, layer in zip(self.names, self.layers)
            for part, tensor in layer.trained().items()
        }

    def load_state_tensors(self, flat: dict[str, torch.Tensor]) -> None:
        """The inverse of `state_tensors`: copy a saved state's tensors in place."""
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in flat.items():
            name, part = key.rsplit(".", 1)
            grouped.setdefault(name, {})[part] = tensor
        self.load_parts(grouped)

    def load_parts(self, saved: dict[str, dict[str, torch.Tensor]]) -> None:
        """Copy `{module: {part: tensor}}` in place after checking that every module and shape matches."""
        if set(saved) != set(self.names):
            raise LoraError("the saved LoRA targets other modules than this run; resume with the same [lora] settings")
        for name, layer in zip(self.names, self.layers):
            ours = {part: tuple(t.shape) for part, t in layer.trained().items()}
            theirs = {part: tuple(t.shape) for part, t in saved[name].items()}
            if ours != theirs:
                raise LoraError(
                    f"the saved LoRA has {_describe(theirs)} at {name}, this run's [lora] settings make "
                    f"{_describe(ours)} (lora.type {layer.kind}); resume with the same [lora] settings and model"
                )
        with torch.no_grad():
            for name, layer in zip(self.names, self.layers):
                for part, tensor in layer.trained().items():
                    tensor.copy_(saved[name][part])

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def _parts(update) -> dict[str, torch.Tensor]:
    return {"down": update.down, "up": update.up} if isinstance(update, LoraWeights) else dict(update.tensors)


def _describe(shapes: dict[str, tuple[int, ...]]) -> str:
    """`rank 8 (down (8, 64), up (64, 8))` for a LoRA, the factor shapes for LoKr / LoHa."""
    parts = ", ".join(f"{part} {shape}" for part, shape in shapes.items())
    return f"rank {shapes['down'][0]} ({parts})" if "down" in shapes else parts


def create_lora(
    transformer: nn.Module,
    rank: int,
    alpha: float,
    blocks: Iterable[str],
    targets: Iterable[str],
    dropout: float = 0.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    kind: str = "lora",
    factor: int = -1,
    full_matrix: bool = False,
    decompose_both: bool = False,
) -> LoraNetwork:
    """A new trainable network whose update starts at zero, so step 0 equals the base model.

    `kind` lora: down Kaiming-uniform (as peft), up zero. lokr / loha: LyCORIS' shapes and
    initialisation (lora/factored.py); `factor`, `full_matrix`, `decompose_both` are LoKr's.
    """
    shapes = linear_shapes(transformer)
    device = next(transformer.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    layers, alphas = {}, {}
    for name in target_modules(transformer, blocks, targets):
        out_features, in_features = shapes[name]
        if kind == "lokr":
            layer = new_lokr(
                out_features, in_features, rank, alpha, generator, factor, full_matrix, decompose_both, dropout
            )
        elif kind == "loha":
            layer = new_loha(out_features, in_features, rank, alpha, generator, dropout)
        else:
            bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)) bound, as nn.Linear and peft
            down = (torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound
            layer = LoraLayer(down, torch.zeros(out_features, rank), alpha / rank, dropout)
        layers[name] = layer.to(device, dtype)
        alphas[name] = float(getattr(layer, "alpha", alpha))
    return LoraNetwork(layers, alphas).attach(transformer)


def load_lora(
    transformer: nn.Module,
    loras: LoraDict,
    multiplier: float = 1.0,
    what: str = "the LoRA",
    partial_ok: bool = False,
    trainable: bool = False,
) -> LoraNetwork:
    """Attach a saved LoRA (frozen unless `trainable`) at a strength; refuses a LoRA of another model.

    A LoRA that fits only in part is an error unless `partial_ok` (`--allow-partial`); the
    modules left out are in `network.unmatched`. Plain LoRA pairs become low-rank branches;
    full patches, LoKr and LoHa become dense branches (see DeltaLayer).
    """
    unmatched = require_fit(
        loras, linear_shapes(transformer), what, partial_ok=partial_ok, biases=bias_modules(transformer)
    )
    modules = dict(transformer.named_modules())
    device = next(transformer.parameters()).device
    layers, alphas = {}, {}
    for name, update in loras.items():
        if name in unmatched:
            continue
        bias = None if update.bias is None else update.bias.float().to(device)
        if isinstance(update, LoraWeights):
            layers[name] = LoraLayer(
                update.down.float().to(device), update.up.float().to(device), update.scale, bias=bias
            )
        else:
            dtype = modules[name].weight.dtype if modules[name].weight.is_floating_point() else torch.float32
            weight = update.delta(torch.float32)
            layers[name] = DeltaLayer(
                None if weight is None else weight.to(device, dtype), None if bias is None else bias.to(dtype)
            )
        alphas[name] = update.alpha
    network = LoraNetwork(layers, alphas, multiplier)
    network.requires_grad_(trainable)
    network.unmatched = unmatched
    return network.attach(transformer)


@torch.no_grad()
def merge_into_weights(transformer: nn.Module, loras: LoraDict, weight: float = 1.0) -> None:
    """W <- W + weight * delta (b <- b + weight * bias delta), computed in fp32 and cast back to the weight's dtype."""
    modules = dict(transformer.named_modules())
    for name, update in loras.items():
        linear = modules[name]
        delta = update.delta(torch.float32)
        if delta is not None:
            update_w = delta.to(linear.weight.device) * weight
            linear.weight.copy_((linear.weight.float() + update_w).to(linear.weight.dtype))
        if update.bias is not None:
            linear.bias.copy_(
                (linear.bias.float() + update.bias.float().to(linear.bias.device) * weight).to(linear.bias.dtype)
            )
