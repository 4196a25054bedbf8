"""Module updates that are not one low-rank pair: full patches (`.diff`) and LyCORIS LoKr / LoHa.

Why a second form beside `formats.LoraWeights`: a LoRA's update is `up @ down`, which the hook
applies as two thin matmuls; a full patch, a Kronecker product or a Hadamard product has no
such shape. They are kept as the file's own factors and expanded to a dense `(out, in)`
delta only when applied (hooked, merged or combined), one module at a time, so reading a
large LoKr file costs its own size, not the model's.

The maths follows what ComfyUI's `comfy/weight_adapter/` applies (the main consumer of
such files), pinned by tests against the `lycoris-lora` library:
- LoKr: `kron(w1, w2)`, each side given whole (`lokr_w1`) or factored (`lokr_w1_a @ lokr_w1_b`,
  or with `lokr_t2` a Tucker core). `alpha / rank` scales the product only when a side is
  factored (rank: the factored side's inner size); two whole sides mean scale 1.
- LoHa: `(hada_w1_a @ hada_w1_b) * (hada_w2_a @ hada_w2_b) * alpha / rank` (rank
  `hada_w1_b.shape[0]`; scale 1 without alpha), with `hada_t1/t2` Tucker cores.
- diff: the file holds `delta W` itself; `.diff_b` a bias delta. Neither is scaled by alpha.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOKR_KEYS = ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
KINDS = ("diff", "lokr", "loha")


def _tucker(core: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """LyCORIS' Tucker rebuild (core i j ..., down j r, up i p -> p r ...), flattened to 2-D for a linear."""
    full = torch.einsum("i j ..., j r, i p -> p r ...", core.float(), down.float(), up.float())
    return full.reshape(full.shape[0], -1).contiguous()


def _side(
    whole: torch.Tensor | None, a: torch.Tensor | None, b: torch.Tensor | None, core: torch.Tensor | None = None
) -> torch.Tensor:
    if whole is not None:
        return whole.float()
    if core is not None:
        return _tucker(core, b, a)
    return a.float() @ b.float()


def lokr_delta(t: dict[str, torch.Tensor], alpha: float | None) -> torch.Tensor:
    """delta W of one LoKr module (fp32), as ComfyUI applies it."""
    w1 = _side(t.get("lokr_w1"), t.get("lokr_w1_a"), t.get("lokr_w1_b"))
    w2 = _side(t.get("lokr_w2"), t.get("lokr_w2_a"), t.get("lokr_w2_b"), t.get("lokr_t2"))
    rank = lokr_rank(t)
    scale = alpha / rank if alpha is not None and rank is not None else 1.0
    delta = torch.kron(w1, w2)
    return delta * scale if scale != 1.0 else delta


def lokr_rank(t: dict[str, torch.Tensor]) -> int | None:
    """The inner size of the factored side (w2's when both are factored, as ComfyUI reads it); None if neither."""
    if t.get("lokr_w2") is None and t.get("lokr_w2_b") is not None:
        return int(t["lokr_w2_b"].shape[0])
    if t.get("lokr_w1") is None and t.get("lokr_w1_b") is not None:
        return int(t["lokr_w1_b"].shape[0])
    return None


def loha_delta(t: dict[str, torch.Tensor], alpha: float | None) -> torch.Tensor:
    """delta W of one LoHa module (fp32), as ComfyUI applies it."""
    m1 = _side(None, t["hada_w1_a"], t["hada_w1_b"], t.get("hada_t1"))
    m2 = _side(None, t["hada_w2_a"], t["hada_w2_b"], t.get("hada_t2"))
    scale = alpha / t["hada_w1_b"].shape[0] if alpha is not None else 1.0
    return m1 * m2 * scale


def _lokr_shape(t: dict[str, torch.Tensor]) -> tuple[int, int]:
    def side(n: str) -> tuple[int, int]:
        if t.get(f"lokr_w{n}") is not None:
            return tuple(t[f"lokr_w{n}"].shape[:2])
        if n == "2" and t.get("lokr_t2") is not None:  # Tucker: w2_a is (rank, out)
            return int(t["lokr_w2_a"].shape[1]), int(t["lokr_w2_b"].shape[1])
        return int(t[f"lokr_w{n}_a"].shape[0]), int(t[f"lokr_w{n}_b"].shape[1])

    (o1, i1), (o2, i2) = side("1"), side("2")
    return o1 * o2, i1 * i2


def _loha_shape(t: dict[str, torch.Tensor]) -> tuple[int, int]:
    if t.get("hada_t1") is not None:
        return int(t["hada_w1_a"].shape[1]), int(t["hada_w1_b"].shape[1])
    return int(t["hada_w1_a"].shape[0]), int(t["hada_w1_b"].shape[1])


_SHAPES = {"diff": lambda t: tuple(t["diff"].shape[:2]), "lokr": _lokr_shape, "loha": _loha_shape}
_DELTAS = {"diff": lambda t, alpha: t["diff"].float(), "lokr": lokr_delta, "loha": loha_delta}


@dataclass
class DeltaWeights:
    """One module's update given in full or as LyCORIS factors; expanded to a dense delta on use.

    `rows` selects a slice of the expanded delta: a fused `attention.qkv` update split into
    its q, k and v parts shares the factors and takes rows [start, stop).
    """

    kind: str  # diff, lokr or loha (a bias-only `.diff_b` module is kind diff with no "diff" tensor)
    tensors: dict[str, torch.Tensor]
    alpha: float | None = None
    rows: tuple[int, int] | None = None
    bias: torch.Tensor | None = None  # delta of the linear's bias (`.diff_b`), applied as is
    source: str = ""  # the module's name in the file, for messages

    @property
    def has_weight(self) -> bool:
        return self.kind != "diff" or "diff" in self.tensors

    @property
    def shape(self) -> tuple[int, int] | None:
        """(out_features, in_features) of the linear this update fits (None: bias only)."""
        if not self.has_weight:
            return None
        out_features, in_features = _SHAPES[self.kind](self.tensors)
        return (self.rows[1] - self.rows[0] if self.rows else out_features), in_features

    @property
    def rank(self) -> int | None:
        """The factored inner size alpha divides (None: a full patch, or a LoKr with both sides whole)."""
        if self.kind == "lokr":
            return lokr_rank(self.tensors)
        return int(self.tensors["hada_w1_b"].shape[0]) if self.kind == "loha" else None

    @property
    def scale(self) -> float:
        """The alpha/rank factor already inside `delta()` (for display only)."""
        rank = self.rank
        return self.alpha / rank if self.alpha is not None and rank else 1.0

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """The dense weight update (None for a bias-only patch), computed in fp32 then cast."""
        if not self.has_weight:
            return None
        full = _DELTAS[self.kind](self.tensors, self.alpha)
        if self.rows:
            full = full[self.rows[0] : self.rows[1]]
        return full.to(dtype)

    def split_rows(self, parts: int) -> list["DeltaWeights"]:
        """Equal row slices (fused qkv -> q, k, v), sharing the factors."""
        out_features = self.shape[0] if self.has_weight else int(self.bias.shape[0])
        size = out_features // parts
        biases = self.bias.chunk(parts) if self.bias is not None else [None] * parts
        rows = [(i * size, (i + 1) * size) if self.has_weight else None for i in range(parts)]
        return [DeltaWeights(self.kind, self.tensors, self.alpha, r, b, self.source) for r, b in zip(rows, biases)]
