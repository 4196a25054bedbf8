"""LoKr / LoHa branch cost on one Z-Image-sized linear (3840 x 3840, 1024 tokens), forward + backward, on the CPU:
our reshaped forward (lora/factored.py) against applying the same update as a dense (out, in) delta built from its
factors each step (what a wrapper that materialises the delta does). Median wall time of N repeats.

    PYTHONPATH=src python scripts/factored_cost.py [N]
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.nn.functional as F

from zturbo_train.lora.deltas import loha_delta, lokr_delta
from zturbo_train.lora.factored import new_loha, new_lokr

SIDE, TOKENS = 3840, 1024
CASES = (("lokr", 8), ("lokr", 32), ("loha", 8), ("loha", 16))  # (network, rank); LoKr at the default factor -1


def _layer(kind: str, rank: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(0)
    make = new_lokr if kind == "lokr" else new_loha
    layer = make(SIDE, SIDE, rank, float(rank), generator)
    with torch.no_grad():  # the zero-initialised factor made non-zero, so the timings see a real update
        for param in layer.parameters():
            param.normal_(generator=generator)
    return layer


def _dense(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    delta = (lokr_delta if layer.kind == "lokr" else loha_delta)(layer.trained(), layer.alpha)
    return F.linear(x, delta)


def _seconds(run, x: torch.Tensor, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        started = time.perf_counter()
        run(x).square().mean().backward()
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def main(repeats: int) -> None:
    torch.set_num_threads(2)
    x = torch.randn(TOKENS, SIDE)
    print("| network, rank | ours s | dense delta s | dense / ours |")
    print("| --- | --- | --- | --- |")
    for kind, rank in CASES:
        layer = _layer(kind, rank)
        ours = _seconds(layer, x, repeats)
        dense = _seconds(lambda t, layer=layer: _dense(layer, t), x, repeats)
        print(f"| {kind}, {rank} | {ours:.3f} | {dense:.3f} | {dense / ours:.1f}x |", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
