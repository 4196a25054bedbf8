"""Merge `zturbo bench` JSON files with the plain reference's results.jsonl and judge the targets.

    python3 scripts/bench_compare.py --plain PLAIN/results.jsonl --out OUTDIR bench-*.json

Writes OUTDIR/bench.json (all rows and sampling runs, plus the plain rows) and
OUTDIR/compare.md (the targets table of issue 9 with measured values, the ratio to the plain
step measured in the same run, and met / MISSED), and prints the markdown.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

# (preset, resolution, s/step target, peak GiB target or None, ratio to the plain step the issue names)
TRAIN_TARGETS = [
    ("high", 1024, 0.25, None, "2.6x"),
    ("high", 512, 0.10, None, "6x"),
    ("16gb", 1024, 0.35, 15.0, None),
    ("8gb", 1024, 0.9, 8.0, None),
]
SAMPLING_TARGET = (1024, 0.8)  # 8 steps at 1024 px in <= 0.8 s of transformer time


def load_plain(path: Path | None) -> list[dict[str, Any]]:
    if path is None or not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plain_step(plain: list[dict[str, Any]], resolution: int, checkpointing: bool = True) -> float | None:
    for row in plain:
        if (
            row.get("what") == "train_step"
            and row.get("tag") == "eager"
            and row.get("res") == resolution
            and row.get("grad_ckpt") == checkpointing
            and "s_per_step" in row
        ):
            return row["s_per_step"]
    return None


def plain_sampling(plain: list[dict[str, Any]], resolution: int) -> float | None:
    return next(
        (r["seconds"] for r in plain if r.get("what") == "sample_transformer" and r.get("res") == resolution), None
    )


def merge(paths: list[Path]) -> dict[str, Any]:
    doc: dict[str, Any] = {"rows": [], "sampling": [], "runs": []}
    for path in paths:
        if not path.is_file():
            continue
        part = json.loads(path.read_text())
        doc["rows"] += part.get("rows", [])
        doc["sampling"] += part.get("sampling", [])
        doc["runs"].append({k: v for k, v in part.items() if k not in ("rows", "sampling")} | {"file": path.name})
    return doc


def find_row(doc: dict[str, Any], preset: str, resolution: int) -> dict[str, Any] | None:
    rows = [
        r
        for r in doc["rows"]
        if r["preset"] == preset
        and r["resolution"] == resolution
        and r["rank"] == 32
        and r["batch"] == 1
        and not r.get("variant")
    ]
    return rows[0] if rows else None


def judge(doc: dict[str, Any], plain: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| target | measured | plain step, same run | speed-up vs plain | verdict |",
        "| --- | --- | --- | --- | --- |",
    ]
    for preset, resolution, seconds, peak, ratio in TRAIN_TARGETS:
        row = find_row(doc, preset, resolution)
        want = (
            f"`{preset}` {resolution} px: <= {seconds} s/step"
            + (f", <= {peak:g} GiB" if peak else "")
            + (f" ({ratio} the plain step)" if ratio else "")
        )
        base = plain_step(plain, resolution)
        if row is None or "error" in row:
            lines.append(f"| {want} | {'not run' if row is None else row['error']} | {_s(base)} | - | not measured |")
            continue
        met = row["s_per_step"] <= seconds and (peak is None or (row["peak_gib"] or 0) <= peak)
        got = f"{row['s_per_step']:.3f} s, {row['peak_gib']} GiB"
        speedup = f"{base / row['s_per_step']:.2f}x" if base else "-"
        lines.append(f"| {want} | {got} | {_s(base)} | {speedup} | {'met' if met else _miss(row, seconds, peak)} |")
    lines.append(_sampling_line(doc, plain))
    return lines


def _sampling_line(doc: dict[str, Any], plain: list[dict[str, Any]]) -> str:
    resolution, seconds = SAMPLING_TARGET
    runs = [s for s in doc["sampling"] if s["resolution"] == resolution and "error" not in s]
    base = plain_sampling(plain, resolution)
    want = f"8 sampling steps at {resolution} px <= {seconds} s"
    if not runs:
        return f"| {want} | not run | {_s(base)} | - | not measured |"
    best = min(runs, key=lambda s: s["seconds_no_lora"])
    got = f"{best['seconds_no_lora']:.3f} s without LoRA, {best['seconds']:.3f} s with (`{best['preset']}`)"
    speedup = f"{base / best['seconds_no_lora']:.2f}x" if base else "-"
    verdict = "met" if best["seconds_no_lora"] <= seconds else f"MISSED by {best['seconds_no_lora'] / seconds - 1:.0%}"
    return f"| {want} | {got} | {_s(base)} | {speedup} | {verdict} |"


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


def _miss(row: dict[str, Any], seconds: float, peak: float | None) -> str:
    parts = []
    if row["s_per_step"] > seconds:
        parts.append(f"time {row['s_per_step'] / seconds - 1:.0%} over")
    if peak is not None and (row["peak_gib"] or 0) > peak:
        parts.append(f"memory {row['peak_gib'] - peak:.2f} GiB over")
    return "MISSED: " + ", ".join(parts)


def all_rows(doc: dict[str, Any], plain: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| preset | levers | px | s/step | peak GiB | est. GiB | vs plain | device busy | by kernel class |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in doc["rows"]:
        if "error" in row:
            lines.append(f"| {_name(row)} | | {row['resolution']} | {row['error']} | | | | | |")
            continue
        base = plain_step(plain, row["resolution"])
        profile = row.get("profile") or {}
        busy = profile.get("device_busy_s")
        classes = ", ".join(f"{k} {v:.3f}" for k, v in (profile.get("by_class_s") or {}).items())
        lever = row["levers"]
        short = (
            f"ckpt {lever['checkpointing']}, {'compiled' if lever['compile'] else 'eager'}, {lever['quantize']}, "
            f"{lever['attention_backend']}{', offload' if lever['offload'] != 'none' else ''}"
        )
        speedup = f"{base / row['s_per_step']:.2f}x" if base else "-"
        busy_text = "-" if busy is None else f"{busy:.3f} s"
        lines.append(
            f"| {_name(row)} | {short} | {row['resolution']} | {row['s_per_step']:.4f} | {row['peak_gib']} "
            f"| {row['estimate_gib']} | {speedup} | {busy_text} | {classes} |"
        )
    return lines


def _name(row: dict[str, Any]) -> str:
    return f"{row['preset']} ({row['variant']})" if row.get("variant") else row["preset"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench", nargs="*", type=Path, help="zturbo bench JSON files")
    parser.add_argument("--plain", type=Path, help="plain_step.py results.jsonl")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    plain = load_plain(args.plain)
    doc = merge(args.bench)
    doc["plain"] = plain
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(doc, indent=1))
    text = "\n".join(["## Targets", "", *judge(doc, plain), "", "## Every row", "", *all_rows(doc, plain), ""])
    (args.out / "compare.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
