"""The optimizers `train.optimizer` names, built over the LoRA's parameters, with LoRA+ groups.

Optional ones come from maintained packages (the `optimizers` extra); this module imports
no package at load time, so preflight can name the `pip install` a missing one needs in a
second, before anything is cached. Each optimizer's state is plain tensors and numbers, which
train/state.py saves as safetensors + JSON, so every one resumes bit-exactly.

Schedule-free AdamW trains at one point (y) and returns the average (x) of its iterates:
`averaged_weights` switches the LoRA to x for saving and previews and puts the training
weights back exactly, so saving never changes what the run does next.
"""

from __future__ import annotations

import importlib.util
import json
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..config import TrainConfig
    from ..lora.network import LoraNetwork

EXTRA = "zturbo-train[optimizers]"


def _adamw(groups: list[dict], train: TrainConfig, device: torch.device):
    import torch

    fused = {"fused": device.type == "cuda"}
    return torch.optim.AdamW(groups, lr=train.lr, weight_decay=train.weight_decay, **{**fused, **train.optimizer_args})


def _adamw8bit(groups: list[dict], train: TrainConfig, device: torch.device):
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(groups, lr=train.lr, weight_decay=train.weight_decay, **train.optimizer_args)


def _prodigy(groups: list[dict], train: TrainConfig, device: torch.device):
    """Prodigy's usual settings: lr 1 (it estimates the step size d; lr scales it), bias correction, and the
    safeguard that keeps d from growing on the small steps of a learning-rate warm-up."""
    from prodigyopt import Prodigy

    return Prodigy(
        groups,
        lr=train.lr,
        weight_decay=train.weight_decay,
        **{"use_bias_correction": True, "safeguard_warmup": True, **train.optimizer_args},
    )


def _adafactor(groups: list[dict], train: TrainConfig, device: torch.device):
    """transformers' Adafactor on our learning rate and schedule (not its own relative step size)."""
    from transformers.optimization import Adafactor

    ours = {"scale_parameter": False, "relative_step": False, "warmup_init": False}
    return Adafactor(groups, lr=train.lr, weight_decay=train.weight_decay, **{**ours, **train.optimizer_args})


def _lion(groups: list[dict], train: TrainConfig, device: torch.device):
    from lion_pytorch import Lion

    return Lion(groups, lr=train.lr, weight_decay=train.weight_decay, **train.optimizer_args)


def _adamw_schedulefree(groups: list[dict], train: TrainConfig, device: torch.device):
    from schedulefree import AdamWScheduleFree

    optimizer = AdamWScheduleFree(groups, lr=train.lr, weight_decay=train.weight_decay, **train.optimizer_args)
    optimizer.train()  # it starts in eval mode and refuses to step there
    return optimizer


@dataclass(frozen=True)
class OptimizerKind:
    build: Callable[[list[dict], Any, Any], Any]
    package: str | None = None  # the import name of the optional package it needs
    pip: str | None = None  # its name on PyPI


OPTIMIZERS = {
    "adamw": OptimizerKind(_adamw),
    "adamw8bit": OptimizerKind(_adamw8bit),
    "prodigy": OptimizerKind(_prodigy, "prodigyopt", "prodigyopt"),
    "adafactor": OptimizerKind(_adafactor),
    "lion": OptimizerKind(_lion, "lion_pytorch", "lion-pytorch"),
    "adamw_schedulefree": OptimizerKind(_adamw_schedulefree, "schedulefree", "schedulefree"),
}


def missing_package(name: str) -> str | None:
    """The one-line error for an optimizer whose optional package is not installed, else None."""
    kind = OPTIMIZERS[name]
    if kind.package is None or importlib.util.find_spec(kind.package) is not None:
        return None
    return (
        f'train.optimizer = "{name}" needs the {kind.pip} package, which is not installed; '
        f'pip install "{EXTRA}" (or pip install {kind.pip})'
    )


def check_arguments(train: TrainConfig) -> None:
    """Build the optimizer over one dummy parameter, so a wrong `train.optimizer_args` key or value is
    one line before any work (the constructors check their own arguments)."""
    import torch

    from ..errors import ConfigError

    try:
        build_optimizer([torch.nn.Parameter(torch.zeros(1))], train, torch.device("cpu"))
    except (TypeError, ValueError, AssertionError) as exc:
        raise ConfigError(
            f"train.optimizer_args {json.dumps(train.optimizer_args)} do not fit optimizer "
            f"{train.optimizer} ({exc or type(exc).__name__}); fix or remove them"
        ) from None


def param_groups(network: LoraNetwork, loraplus_ratio: float = 1.0) -> list[dict]:
    """One group, or with LoRA+ (ratio != 1) the down matrices at lr and the up (B) matrices at lr x ratio.

    `lr_scale` rides in the group, so TrainStep.update scales the scheduled lr per group."""
    params = network.trainable_parameters()
    if loraplus_ratio == 1.0:
        return [{"params": params}]
    ups = {id(layer.up) for layer in network.layers}
    return [
        {"params": [p for p in params if id(p) not in ups], "lr_scale": 1.0},
        {"params": [p for p in params if id(p) in ups], "lr_scale": loraplus_ratio},
    ]


def build_optimizer(params: Sequence[Any] | list[dict], train: TrainConfig, device: torch.device):
    """`train.optimizer` over `params` (tensors, or groups from `param_groups`), ready to step."""
    groups = list(params)
    if groups and not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    return OPTIMIZERS[train.optimizer].build(groups, train, device)


def is_schedule_free(optimizer: Any) -> bool:
    """Schedule-free optimizers mark their groups with the mode (`train_mode`) and switch it by train()/eval()."""
    return "train_mode" in optimizer.param_groups[0] and callable(getattr(optimizer, "eval", None))


@contextmanager
def averaged_weights(optimizer: Any, params: Sequence[torch.nn.Parameter]) -> Iterator[None]:
    """The weights a run should show and save: schedule-free's average x, then its training weights y put
    back exactly (switching back would round y). Other optimizers: the parameters as they are."""
    if not is_schedule_free(optimizer):
        yield
        return
    import torch

    kept = [p.detach().clone() for p in params]
    optimizer.eval()
    try:
        yield
    finally:
        optimizer.train()
        with torch.no_grad():
            for param, value in zip(params, kept):
                param.copy_(value)
