"""LoKr and LoHa as trainable hook branches (`[lora] type = "lokr" | "loha"`), beside LoRA's LoraLayer.

What was chosen and why (issue #16 asked to build on a maintained library where it fits):
- peft's LoKrModel / LoHaModel wrap every adapted linear and rename its weight
  (`to_q.weight` -> `to_q.base_layer.weight`), which breaks what our hooks keep intact: base
  names for merging and checkpoints, quantized bases (nf4 / int8 / fp8 linears replaced in
  memory/quantize.py), the live training adapter's hooks. Not used, as for LoRA.
- lycoris-lora's networks (`create_lycoris`) patch each module's `forward` and read its
  `weight`, which a quantized base does not hold as a plain tensor. Its functional API
  (`lycoris.functional.lokr / loha`) does fit a hook, but every call goes through its backend
  dispatch (Triton / TileLang kernels, or a per-op torch.compile on CUDA), which our CPU tests
  cannot check and which would nest a compile inside our regional one; pinned to its "torch"
  backend it runs the same few plain ops as below. In 4.1.3 its `loha.diff_weight` also fails
  with a float scale (HadaWeight saves it for backward), and `lokr.weight_gen` ignores
  `full_matrix` for linears and initialises LoHa unlike `LohaModule`. So the maths here is
  ours, in plain torch ops (traced by the regional compile, cast by autocast, no per-call
  dispatch), and lycoris-lora, in the dev extra, is the judge: tests build LyCORIS' own
  modules for the same settings and check the shapes, the zero start and the delta.

LyCORIS' conventions, as its `LokrModule` / `LohaModule` apply them to a linear (out, in):
- LoKr: delta W = scale * kron(w1, w2). (out_l, out_k) = factorization(out, factor),
  (in_m, in_n) = factorization(in, factor); w1 is (out_l, in_m), w2 (out_k, in_n). w2 is
  factored `lokr_w2_a (out_k, r) @ lokr_w2_b (r, in_n)` unless `full_matrix` or r >=
  max(out_k, in_n) / 2 (then whole); w1 is factored the same way only with `decompose_both`
  (and r < max(out_l, in_m) / 2, not full_matrix). scale = alpha / r when a side is factored,
  else 1 (LyCORIS then writes alpha = r). Init: w1 (or its factors) and w2_a Kaiming-uniform,
  w2 (or w2_b) zero, so the update starts at zero.
- LoHa: delta W = (alpha / r) * (hada_w1_a @ hada_w1_b) * (hada_w2_a @ hada_w2_b); `_a` are
  (out, r), `_b` (r, in). Init: w1_a normal(0.1), w1_b and w2_b normal(1), w2_a zero.
- Dropout: LyCORIS warns that it has no input dropout for LoKr / LoHa; `lora.dropout` drops
  the branch input as it does for LoRA.

The forward never builds the (out, in) delta:
- LoKr: kron(w1, w2) x = vec(w1 X w2^T) with X = x as (in_m, in_n): two small matmuls over
  reshaped activations (~(in * out_k + out * in_m) FLOPs a token instead of in * out). Autograd
  keeps about one output-sized intermediate per token for the backward (memory/estimate.py).
- LoHa: (A1 B1) * (A2 B2) = KR(A1, A2) @ KR(B1, B2) with KR the row-wise (face-splitting)
  Kronecker product, so LoHa runs as a LoRA of rank r^2: factors of (out + in) * r^2, an
  r^2-wide intermediate per token. Below r ~ sqrt(out * in / (out + in)) (44 for Z-Image's
  3840 x 3840) that is smaller than the dense delta; above, larger (the estimate counts it).
Measured on one 3840 x 3840 layer, 1024 tokens, forward + backward (fp32, 2 CPU threads, quiet;
scripts/factored_cost.py, BENCHMARKS.md): LoKr 0.06-0.09 s, LoHa at rank 8-16 0.04-0.09 s, against
0.53-0.81 s through a dense delta built from the same factors.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .deltas import DeltaWeights

if TYPE_CHECKING:  # pragma: no cover
    from ..config import LoraConfig

TYPES = ("lora", "lokr", "loha")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m * n = dimension, m <= n: `factor` itself when it divides, else the most balanced split with
    m <= factor (-1: no bound). LyCORIS' rule (lycoris.functional.general.factorization), pinned by a test."""
    if factor > 0 and dimension % factor == 0:
        return min(factor, dimension // factor), max(factor, dimension // factor)
    bound = dimension if factor < 0 else factor
    m, n = 1, dimension
    while m < n:
        candidate = m + 1
        while dimension % candidate:
            candidate += 1
        if candidate + dimension // candidate > m + n or candidate > bound:
            break
        m, n = candidate, dimension // candidate
    return min(m, n), max(m, n)


def lokr_shapes(
    out_features: int, in_features: int, rank: int, factor: int = -1, full_matrix: bool = False, decompose_both=False
) -> dict[str, tuple[int, int]]:
    """The LoKr tensors LyCORIS makes for a linear, by file key."""
    out_l, out_k = factorization(out_features, factor)
    in_m, in_n = factorization(in_features, factor)
    shapes = {}
    if decompose_both and not full_matrix and rank < max(out_l, in_m) / 2:
        shapes.update(lokr_w1_a=(out_l, rank), lokr_w1_b=(rank, in_m))
    else:
        shapes["lokr_w1"] = (out_l, in_m)
    if not full_matrix and rank < max(out_k, in_n) / 2:
        shapes.update(lokr_w2_a=(out_k, rank), lokr_w2_b=(rank, in_n))
    else:
        shapes["lokr_w2"] = (out_k, in_n)
    return shapes


def loha_shapes(out_features: int, in_features: int, rank: int) -> dict[str, tuple[int, int]]:
    """The LoHa tensors of a linear, by file key."""
    return {
        "hada_w1_a": (out_features, rank),
        "hada_w1_b": (rank, in_features),
        "hada_w2_a": (out_features, rank),
        "hada_w2_b": (rank, in_features),
    }


def lokr_scale(shapes: dict[str, tuple[int, int]], rank: int, alpha: float) -> float:
    """alpha / rank when a side is factored, else 1 (LyCORIS' LokrModule; ComfyUI reads it the same way)."""
    return alpha / rank if "lokr_w1" not in shapes or "lokr_w2" not in shapes else 1.0


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """nn.init.kaiming_uniform_(a=sqrt(5)) as LyCORIS calls it: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), from a seed."""
    bound = 1.0 / math.sqrt(shape[1])
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


class _FactoredLayer(nn.Module):
    """Parameters named as the file keys (`lokr_w1`, `hada_w1_a` ...), fp32, with the branch's scale and dropout."""

    kind = ""

    def __init__(self, tensors: dict[str, torch.Tensor], scale: float, alpha: float, dropout: float = 0.0):
        super().__init__()
        for key, value in tensors.items():
            self.register_parameter(key, nn.Parameter(value))
        self.keys = tuple(tensors)
        self.scale, self.alpha = scale, alpha
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def trained(self) -> dict[str, nn.Parameter]:
        """The factors, by file key (what the training state saves)."""
        return {key: getattr(self, key) for key in self.keys}

    def to_update(self, alpha: float | None = None) -> DeltaWeights:
        """Detached fp32 CPU copies as the file holds them (alpha as LyCORIS writes it)."""
        tensors = {key: getattr(self, key).detach().float().cpu().clone() for key in self.keys}
        return DeltaWeights(self.kind, tensors, self.alpha)

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x)
        return x if torch.is_autocast_enabled(x.device.type) else x.to(torch.float32)

    def _scaled(self, out: torch.Tensor) -> torch.Tensor:
        return out * self.scale if self.scale != 1.0 else out


class LokrLayer(_FactoredLayer):
    """scale * kron(w1, w2) x, computed as w1 X w2^T on the reshaped input (see the module docstring)."""

    kind = "lokr"

    def __init__(self, tensors: dict[str, torch.Tensor], scale: float, alpha: float, dropout: float = 0.0):
        super().__init__(tensors, scale, alpha, dropout)
        self.whole_w1, self.whole_w2 = "lokr_w1" in tensors, "lokr_w2" in tensors
        self.in_m = int(tensors["lokr_w1" if self.whole_w1 else "lokr_w1_b"].shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._input(x)
        lead = x.shape[:-1]
        w1 = self.lokr_w1 if self.whole_w1 else self.lokr_w1_a @ self.lokr_w1_b  # (out_l, in_m)
        h = x.reshape(*lead, self.in_m, -1)  # X: (in_m, in_n)
        if self.whole_w2:
            h = F.linear(h, self.lokr_w2)
        else:
            h = F.linear(F.linear(h, self.lokr_w2_b), self.lokr_w2_a)  # X w2^T: (in_m, out_k)
        h = F.linear(h.transpose(-1, -2), w1)  # (w1 X w2^T)^T: (out_k, out_l)
        return self._scaled(h.transpose(-1, -2).reshape(*lead, -1))


class LohaLayer(_FactoredLayer):
    """scale * ((w1_a w1_b) * (w2_a w2_b)) x, as a rank-r^2 LoRA of row-wise Kronecker factors."""

    kind = "loha"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._input(x)
        out_features, rank = self.hada_w1_a.shape
        up = (self.hada_w1_a[:, :, None] * self.hada_w2_a[:, None, :]).reshape(out_features, rank * rank)
        down = (self.hada_w1_b[:, None, :] * self.hada_w2_b[None, :, :]).reshape(rank * rank, -1)
        return self._scaled(F.linear(F.linear(x, down), up))


def new_lokr(
    out_features: int,
    in_features: int,
    rank: int,
    alpha: float,
    generator: torch.Generator,
    factor: int = -1,
    full_matrix: bool = False,
    decompose_both: bool = False,
    dropout: float = 0.0,
) -> LokrLayer:
    """A LoKr branch initialised as LyCORIS does (the zero factor: w2, or w2_b)."""
    shapes = lokr_shapes(out_features, in_features, rank, factor, full_matrix, decompose_both)
    zero = {"lokr_w2", "lokr_w2_b"}
    tensors = {k: torch.zeros(s) if k in zero else _kaiming_uniform(s, generator) for k, s in shapes.items()}
    scale = lokr_scale(shapes, rank, alpha)
    return LokrLayer(tensors, scale, alpha if scale != 1.0 else float(rank), dropout)


def new_loha(
    out_features: int, in_features: int, rank: int, alpha: float, generator: torch.Generator, dropout: float = 0.0
) -> LohaLayer:
    """A LoHa branch initialised as LyCORIS' LohaModule (w2_a zero)."""
    std = {"hada_w1_a": 0.1, "hada_w1_b": 1.0, "hada_w2_b": 1.0}
    tensors = {
        k: torch.randn(s, generator=generator) * std[k] if k in std else torch.zeros(s)
        for k, s in loha_shapes(out_features, in_features, rank).items()
    }
    return LohaLayer(tensors, alpha / rank, alpha, dropout)


def network_options(lora: LoraConfig) -> dict[str, Any]:
    """create_lora's keyword arguments for the network type of a [lora] table."""
    return {
        "kind": lora.type,
        "factor": lora.factor,
        "full_matrix": lora.full_matrix,
        "decompose_both": lora.decompose_both,
    }


def network_args(lora: LoraConfig) -> dict[str, str]:
    """`ss_network_args` as LyCORIS' kohya network records them (text values): the algo and LoKr's options."""
    args = {"algo": lora.type, "dropout": str(lora.dropout)}
    if lora.type == "lokr":
        args.update(factor=str(lora.factor), full_matrix=str(lora.full_matrix), decompose_both=str(lora.decompose_both))
    return args


def network_label(lora: Mapping[str, Any]) -> str:
    """`LoRA`, `LoHa`, or `LoKr (factor -1, full_matrix)` for plans and reports, from a [lora] table as saved."""
    kind = lora.get("type", "lora")
    name = {"lora": "LoRA", "lokr": "LoKr", "loha": "LoHa"}[kind]
    if kind != "lokr":
        return name
    options = [f"factor {lora.get('factor', -1)}"] + [k for k in ("full_matrix", "decompose_both") if lora.get(k)]
    return f"{name} ({', '.join(options)})"
