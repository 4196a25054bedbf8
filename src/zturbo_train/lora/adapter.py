"""The de-distillation training adapter: load, apply, deactivate, invert, restore.

Training runs on `W0 + w*dA` (the adapter at weight w) with the new LoRA `dL` on top;
previews are drawn with the adapter removed again, so they show `W0 + dL`, what users get
at inference. `TrainingAdapter` keeps that as an explicit, checked state:

    off       --apply()/merge()-->  training  --invert()-->   inverted
    off  <--deactivate()--  training|inverted   <--restore()--

Inverting twice, restoring when not inverted or applying twice is an `AdapterError`, never
a second subtraction. `deactivate()` from `off` does nothing, so cleanup code can call it.

Modes (`[model] adapter_mode`) and what they cost. Numbers: relative L2 error of the
builtin:tiny transformer output with builtin:tiny-adapter (whose effect is ~5 %), pinned
by tests/lora/test_adapter.py. For scale: a bf16 forward of the base model is ~0.7 % off the
fp32 forward, so anything below that is noise bf16 makes anyway.
- `merge` folds `W <- W + w*scale*B@A` in fp32 and casts back: the training step costs
  nothing extra, but in bf16 the model trains on `round_bf16(W0 + dA)` instead of
  `W0 + dA`, one rounding per weight (at most 2^-9 relative). Its training-state output
  is ~0.5 % off live mode's. Inversion, chosen by `inversion=`:
  - `branch` (default) attaches the adapter as an fp32 hook with multiplier -w. The
    weights are never written again, so `restore()` is bit-exact and nothing can drift
    over many preview rounds; inverted, the output is ~0.5 % off the base (the rounding of
    the merged weights). Holds the adapter in fp32 on the device while sampling.
  - `subtract` folds `-w*dA` back out in fp32: no hook while sampling, inverted output
    ~0.5 % off the base, and every switch rounds the weights again, so `restore()` may move
    a weight by one bf16 step (measured: none of 590k moved in 21 rounds; the test bounds it).
  `deactivate()` of a merged adapter subtracts in fp32: in bf16 ~1 % of the weights end one
  bf16 step from W0 (output ~0.5 % off the base). In fp32 every path is exact up to
  summation order (~2e-7).
- `live` keeps the adapter as a frozen fp32 hook branch (lora.LoraNetwork), switched on
  for training and off for sampling: off is bit-identical to the base model (the hook adds
  nothing), the base weights are never written (so it works over a quantized base), and
  each step pays a rank-r branch per adapted linear (small next to the linear itself).

Adapter files: `diffusion_model.<module>.lora_A/lora_B` keys (any style formats.py reads),
rank read from the lora_A shape, no alpha key meaning alpha = rank (scale 1). Every key
must name a linear of the loaded transformer with the right shape; anything else means
the adapter is for another model and is an error, never a silent skip.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import AdapterError, LoraError
from ..refs import hub_file, is_builtin
from ..testing.tiny import tiny_adapter_file
from ..zimage import ADAPTER_ALIASES
from .formats import LoraDict, LoraWeights, is_low_rank, linear_shapes, read_lora_file, require_fit, summarize
from .network import LoraNetwork, load_lora, merge_into_weights

MODES = ("merge", "live")
INVERSIONS = ("branch", "subtract")
MERGEABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_NEXT_STEP = "set [model] adapter to v2 (or v1), a Z-Image Turbo training adapter file, or none"


class AdapterState(str, Enum):
    """Where the adapter stands; the value is what logs and errors print."""

    OFF = "off"  # no effect on forward passes
    TRAINING = "training"  # W0 + w*dA (+ the trained LoRA)
    INVERTED = "inverted"  # the adapter's effect removed: W0 (+ the trained LoRA), for sampling


# ------------------------------------------------------------------------------ resolving and loading


def _builtin_files() -> dict[str, Callable[[], Path]]:
    return {"builtin:tiny-adapter": tiny_adapter_file}


def is_hub_ref(ref: str) -> bool:
    """`v1`, `v2` or `owner/repo/file.safetensors` (when no such local file exists)."""
    return hub_file(ref) is not None


def resolve_adapter(ref: str) -> Path | None:
    """The local .safetensors file of an adapter reference; None for `none`.

    Hub references go through the download module's cache, which says which
    `zturbo download --adapter ...` fetches a missing file; nothing is fetched here.
    """
    if ref == "none":
        return None
    if is_builtin(ref):
        builtins = _builtin_files()
        if ref not in builtins:
            raise AdapterError(f"unknown builtin adapter {ref!r}; the builtin adapter is {', '.join(builtins)}")
        return builtins[ref]()
    local = Path(ref).expanduser()
    if ref not in ADAPTER_ALIASES and local.is_file():
        return local
    if local.is_dir():
        raise AdapterError(f"adapter {local} is a folder; {_NEXT_STEP}")
    if is_hub_ref(ref):
        from ..hub.download import resolve_adapter_file

        return Path(resolve_adapter_file(ref))
    raise AdapterError(f"adapter file {local} does not exist; check the path or {_NEXT_STEP}")


def read_adapter(path: Path) -> LoraDict:
    """Read an adapter file (safetensors only) into the converter's form; the fit is checked on use."""
    try:
        loras, _ = read_lora_file(path)
    except LoraError as exc:
        raise AdapterError(f"training adapter: {exc}; {_NEXT_STEP}") from None
    if not is_low_rank(loras):
        raise AdapterError(
            f"training adapter {path} holds full patches, LoKr or LoHa updates, not plain LoRA pairs; {_NEXT_STEP}"
        )
    return loras


def check_fit(loras: LoraDict, transformer: nn.Module, what: str) -> None:
    """Every module must exist in this transformer with the adapter's shape (no partial adapters)."""
    try:
        require_fit(loras, linear_shapes(transformer), what, partial_ok=False, can_allow=False)
    except LoraError as exc:
        raise AdapterError(f"{exc}; {_NEXT_STEP}") from None


def check_mergeable(loras: LoraDict, transformer: nn.Module) -> None:
    """Merge mode writes the weights, so they must be plain float tensors (not a quantized base)."""
    modules = dict(transformer.named_modules())
    for name in loras:
        weight = getattr(modules[name], "weight", None)
        plain = isinstance(weight, torch.Tensor) and type(weight.data) is torch.Tensor
        if not plain or weight.dtype not in MERGEABLE_DTYPES:
            kind = type(weight.data).__name__ if isinstance(weight, torch.Tensor) else type(weight).__name__
            dtype = getattr(weight, "dtype", None)
            raise AdapterError(
                f"{name} holds {kind} weights of dtype {dtype} (a quantized base?), which the "
                f'adapter cannot be merged into; set [model] adapter_mode = "live"'
            )


# ------------------------------------------------------------------------------ how each mode acts


class _Mechanism(ABC):
    """What applying, inverting, restoring and removing the adapter does to the model in one mode."""

    def __init__(self, transformer: nn.Module, loras: LoraDict, what: str):
        self.transformer, self.loras, self.what = transformer, loras, what
        self.network: LoraNetwork | None = None

    @abstractmethod
    def apply(self, weight: float) -> None:
        """off -> training."""

    @abstractmethod
    def invert(self, weight: float) -> None:
        """training -> inverted."""

    @abstractmethod
    def restore(self, weight: float) -> None:
        """inverted -> training."""

    @abstractmethod
    def remove(self, weight: float, inverted: bool) -> None:
        """training or inverted -> off."""

    def _attach(self, multiplier: float) -> None:
        self.network = load_lora(
            self.transformer, self.loras, multiplier=multiplier, what=self.what, partial_ok=False, trainable=False
        )

    def _detach(self) -> None:
        if self.network is not None:
            self.network.detach()
            self.network = None

    def _fold(self, weight: float) -> None:
        """W <- W + weight*dA in fp32, one module at a time on the weight's device (small peak memory)."""
        modules = dict(self.transformer.named_modules())
        for name, lora in self.loras.items():
            device = modules[name].weight.device
            merge_into_weights(self.transformer, {name: _to_device(lora, device)}, weight)


class _Live(_Mechanism):
    """A frozen hook branch: on for training, off for sampling; exact both ways."""

    def apply(self, weight: float) -> None:
        self._attach(weight)

    def invert(self, weight: float) -> None:
        self.network.enabled = False

    def restore(self, weight: float) -> None:
        self.network.enabled = True

    def remove(self, weight: float, inverted: bool) -> None:
        self._detach()


class _MergeBranch(_Mechanism):
    """Folded into the weights; sampling cancels it with a -w branch, so the weights never drift."""

    def apply(self, weight: float) -> None:
        self._fold(weight)

    def invert(self, weight: float) -> None:
        self._attach(-weight)

    def restore(self, weight: float) -> None:
        self._detach()

    def remove(self, weight: float, inverted: bool) -> None:
        self._detach()
        self._fold(-weight)


class _MergeSubtract(_Mechanism):
    """Folded into the weights; sampling folds -w back out (no hook, one rounding per switch)."""

    def apply(self, weight: float) -> None:
        self._fold(weight)

    def invert(self, weight: float) -> None:
        self._fold(-weight)

    def restore(self, weight: float) -> None:
        self._fold(weight)

    def remove(self, weight: float, inverted: bool) -> None:
        if not inverted:
            self._fold(-weight)


class _Baked(_MergeBranch):
    """Merged, then the base was quantized or cast to fp8: the adapter is part of the stored
    weights for good. Sampling still removes it exactly (the -w branch); off only drops hooks."""

    def remove(self, weight: float, inverted: bool) -> None:
        self._detach()


class _Nothing(_Mechanism):
    """`adapter = none`: the states are still tracked so the loop's calls are checked the same way."""

    def apply(self, weight: float) -> None:
        pass

    def invert(self, weight: float) -> None:
        pass

    def restore(self, weight: float) -> None:
        pass

    def remove(self, weight: float, inverted: bool) -> None:
        pass


_MECHANISMS: dict[tuple[str, str], type[_Mechanism]] = {
    ("live", "branch"): _Live,
    ("live", "subtract"): _Live,
    ("merge", "branch"): _MergeBranch,
    ("merge", "subtract"): _MergeSubtract,
}


def _to_device(lora: LoraWeights, device: torch.device) -> LoraWeights:
    return LoraWeights(down=lora.down.to(device), up=lora.up.to(device), alpha=lora.alpha)


# ------------------------------------------------------------------------------ the adapter


class TrainingAdapter:
    """The training adapter on one transformer, with its state checked on every switch."""

    def __init__(
        self,
        transformer: nn.Module,
        loras: LoraDict,
        mode: str = "merge",
        weight: float = 1.0,
        inversion: str = "branch",
        source: str = "(in memory)",
        ref: str | None = None,
    ):
        if mode not in MODES:
            raise AdapterError(f"adapter mode {mode!r} is not one of {', '.join(MODES)}")
        if inversion not in INVERSIONS:
            raise AdapterError(f"adapter inversion {inversion!r} is not one of {', '.join(INVERSIONS)}")
        self.weight = _check_weight(weight)
        self.mode, self.inversion, self.source, self.loras = mode, inversion, source, loras
        self.ref = ref or source  # as the user wrote it (v2, a path), for metadata
        if loras:
            check_fit(loras, transformer, f"the training adapter {source}")
            if mode == "merge":
                check_mergeable(loras, transformer)
        kind = _MECHANISMS[(mode, inversion)] if loras else _Nothing
        self._mechanism = kind(transformer, loras, f"the training adapter {source}")
        self._state = AdapterState.OFF

    # -- construction
    @classmethod
    def load(
        cls, ref: str, transformer: nn.Module, mode: str = "merge", weight: float = 1.0, inversion: str = "branch"
    ) -> "TrainingAdapter":
        """From a reference: a .safetensors path, builtin:tiny-adapter, v1/v2, owner/repo/file.safetensors or none."""
        path = resolve_adapter(ref)
        loras = {} if path is None else read_adapter(path)
        return cls(transformer, loras, mode, weight, inversion, source=str(path or ref), ref=ref)

    @classmethod
    def from_config(
        cls, model_cfg: ModelConfig, transformer: nn.Module, inversion: str = "branch"
    ) -> "TrainingAdapter":
        """From `[model]` (adapter, adapter_mode, adapter_weight); the adapter starts `off`."""
        return cls.load(model_cfg.adapter, transformer, model_cfg.adapter_mode, model_cfg.adapter_weight, inversion)

    # -- state
    @property
    def state(self) -> AdapterState:
        return self._state

    @property
    def is_none(self) -> bool:
        """True for `adapter = none`: every switch is checked but changes nothing."""
        return not self.loras

    def summary(self) -> dict[str, Any]:
        """What logs and LoRA metadata record about the adapter."""
        out: dict[str, Any] = {
            "ref": self.ref,
            "file": self.source,
            "mode": self.mode,
            "weight": self.weight,
            "state": self._state.value,
        }
        if self.mode == "merge":
            out["inversion"] = self.inversion
        return out | (summarize(self.loras) if self.loras else {"modules": 0})

    def _require(self, state: AdapterState, action: str, hint: str) -> None:
        if self._state is not state:
            raise AdapterError(
                f"cannot {action} the training adapter while it is {self._state.value!r} "
                f"(needs {state.value!r}); {hint}"
            )

    # -- switches
    def apply(self, weight: float | None = None) -> None:
        """off -> training: the adapter acts on every forward pass (merged or live, as the mode says)."""
        self._require(AdapterState.OFF, "apply", "it is already applied; call deactivate() first")
        if weight is not None:
            self.weight = _check_weight(weight)
        self._mechanism.apply(self.weight)
        self._state = AdapterState.TRAINING

    def merge(self, weight: float | None = None) -> None:
        """off -> training by folding W <- W + weight*scale*B@A (fp32, cast back); merge mode only."""
        if self.mode != "merge":
            raise AdapterError('merge() needs adapter_mode "merge"; this adapter is live, call apply() instead')
        self.apply(weight)

    def invert(self) -> None:
        """training -> inverted: remove the adapter's effect for sampling (W0 + the trained LoRA)."""
        self._require(
            AdapterState.TRAINING,
            "invert",
            "invert() once, then restore() before inverting again"
            if self._state is AdapterState.INVERTED
            else "call apply() first",
        )
        self._mechanism.invert(self.weight)
        self._state = AdapterState.INVERTED

    def restore(self) -> None:
        """inverted -> training: after sampling, the adapter acts again."""
        self._require(AdapterState.INVERTED, "restore", "restore() only follows invert()")
        self._mechanism.restore(self.weight)
        self._state = AdapterState.TRAINING

    def bake(self) -> None:
        """The merged weights were just quantized (fp8, nf4, int8): from now on the adapter cannot
        be folded out of them, so inversion uses a branch and deactivate() only removes hooks
        (reload the model to get the plain base back). Nothing to do for live mode or none."""
        if self.mode != "merge" or self.is_none or self._state is AdapterState.OFF:
            return
        if self._state is not AdapterState.TRAINING:
            raise AdapterError("bake() the training adapter right after apply(), before sampling inverts it")
        baked = _Baked(self._mechanism.transformer, self.loras, self._mechanism.what)
        self._mechanism, self.inversion = baked, "branch"

    def to(self, device: torch.device | str) -> None:
        """Put the adapter's hook branch (live mode) on `device`: apply_levers calls it after moving a
        base that was loaded on the host, since the branch is not a submodule of the transformer."""
        if self._mechanism.network is not None:
            self._mechanism.network.to(device)

    def deactivate(self) -> None:
        """training|inverted -> off: no further effect on forward passes, no hooks left; a no-op when off."""
        if self._state is AdapterState.OFF:
            return
        self._mechanism.remove(self.weight, inverted=self._state is AdapterState.INVERTED)
        self._state = AdapterState.OFF

    @contextmanager
    def inverted(self) -> Iterator["TrainingAdapter"]:
        """`with adapter.inverted(): sample(...)`: restored afterwards even if sampling fails."""
        self.invert()
        try:
            yield self
        finally:
            self.restore()


def _check_weight(weight: float) -> float:
    weight = float(weight)
    if not math.isfinite(weight):
        raise AdapterError(f"adapter weight {weight} is not a finite number; set [model] adapter_weight, e.g. 1.0")
    return weight
