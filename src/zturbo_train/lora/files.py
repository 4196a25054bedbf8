"""LoRA files named on the command line: `--lora PATH[:STRENGTH]`, read and hashed, then attached.

Every LoRA is read before any model loads, so a bad file fails in a second, not after
minutes; the sha256 goes into image and model metadata to find the exact file again.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from ..preflight import LoraSpec, check_lora_files, parse_lora_spec  # noqa: F401  (parse_lora_spec: re-exported)
from .formats import LoraDict, partial_warning, read_lora_file
from .network import LoraNetwork, load_lora

Log = Callable[[str], None]


def _quiet(message: str) -> None:
    """Default log: say nothing (the CLI passes its console)."""


@dataclass
class LoadedLora:
    """A LoRA file read and hashed, ready to attach or merge."""

    spec: LoraSpec
    weights: LoraDict
    metadata: dict[str, str]
    sha256: str

    def describe(self) -> dict[str, object]:
        """What goes into image and model metadata: enough to find the exact file again."""
        return {
            "name": self.spec.path.name,
            "path": str(self.spec.path),
            "strength": self.spec.strength,
            "sha256": self.sha256,
        }


def file_sha256(path: Path) -> str:
    """sha256 of a file, streamed (LoRAs can be hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_loras(specs: Iterable[LoraSpec]) -> list[LoadedLora]:
    """Read every LoRA before any model loads, so a bad file fails in a second, not after minutes."""
    loaded = []
    for spec in specs:
        check_lora_files([spec])
        weights, metadata = read_lora_file(spec.path)
        loaded.append(LoadedLora(spec, weights, metadata, file_sha256(spec.path)))
    return loaded


def attach_loras(
    transformer: torch.nn.Module, loras: Sequence[LoadedLora], log: Log = _quiet, allow_partial: bool = False
) -> list["LoraNetwork"]:
    """Hook each LoRA on at its strength; another model's LoRA is refused, and so is a partial match
    unless `allow_partial` (then it is a warning naming the keys left out)."""
    networks = []
    for item in loras:
        network = load_lora(
            transformer, item.weights, multiplier=item.spec.strength, what=str(item.spec.path), partial_ok=allow_partial
        )
        if network.unmatched:
            log(partial_warning(item.spec.path.name, item.weights, network.unmatched))
        networks.append(network)
    return networks
