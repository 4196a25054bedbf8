"""Rewrite safetensors shards as bf16, one tensor in memory at a time (`zturbo download --bf16`).

Z-Image Turbo's transformer is published in fp32 (24.6 GB in 3 shards) and trained in bf16.
Storing it as bf16 halves the disk and the load time and changes nothing the trainer sees:
the loader casts to bf16 anyway. safetensors' own writer needs every tensor of a shard in
memory (about 10 GB here), so the file is streamed instead: the header is computed from
shapes and dtypes alone, then each tensor is read through safe_open's memory map, cast and
written. Peak memory is the largest tensor. The result replaces the shard atomically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import DownloadError
from ..fileio import atomic_path, safetensors_data_bytes, write_json
from .fetch import NullReporter, Reporter

TO_BF16 = {"F64", "F32", "F16"}
DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


def convert_to_bf16(path: Path, reporter: Reporter | None = None) -> int:
    """Rewrite one safetensors file in place with its float tensors as bf16; returns the new size.

    The new file replaces the old one only once it is complete and re-opens as safetensors, so
    an interrupted conversion leaves the fp32 shard as it was.
    """
    import torch
    from safetensors import safe_open

    reporter = reporter or NullReporter()
    with safe_open(str(path), framework="pt") as src:
        header, order, total = bf16_header(src, path)
        blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
        blob += b" " * (-len(blob) % 8)
        reporter.begin(f"bf16 {path.parent.name}/{path.name}", total)
        try:
            with atomic_path(path) as tmp, open(tmp, "wb") as out:
                out.write(len(blob).to_bytes(8, "little"))
                out.write(blob)
                for key in order:
                    tensor = src.get_tensor(key)
                    if header[key]["dtype"] == "BF16":
                        tensor = tensor.to(torch.bfloat16)
                    out.write(raw_bytes(tensor))
                    reporter.update(header[key]["data_offsets"][1])
                out.flush()
                _check(tmp, header)
        finally:
            reporter.end()
    return path.stat().st_size


def bf16_header(src: Any, path: Path) -> tuple[dict[str, Any], list[str], int]:
    """The header of the converted file from shapes and dtypes alone; tensors in safetensors' own order.

    Like safetensors' writer, wider dtypes come first so every tensor starts aligned to its size.
    """
    entries = []
    for key in src.keys():
        piece = src.get_slice(key)
        dtype = "BF16" if piece.get_dtype() in TO_BF16 else piece.get_dtype()
        if dtype not in DTYPE_BYTES:
            raise DownloadError(
                f"cannot convert {path} to bf16: tensor {key} has dtype {dtype}; download without --bf16"
            )
        count = 1
        for dim in piece.get_shape():
            count *= dim
        entries.append((-DTYPE_BYTES[dtype], key, dtype, list(piece.get_shape()), count * DTYPE_BYTES[dtype]))
    header: dict[str, Any] = {}
    offset = 0
    for _, key, dtype, shape, nbytes in sorted(entries):
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    order = list(header)
    if src.metadata():
        header["__metadata__"] = src.metadata()
    return header, order, offset


def raw_bytes(tensor: Any) -> memoryview:
    """A tensor's bytes as safetensors stores them (little-endian, C order)."""
    import torch

    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def _check(path: Path, header: dict[str, Any]) -> None:
    """The written file must open as safetensors with exactly the planned tensors."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as check:
        got = {k: (check.get_slice(k).get_dtype(), list(check.get_slice(k).get_shape())) for k in check.keys()}
    want = {k: (v["dtype"], v["shape"]) for k, v in header.items() if k != "__metadata__"}
    if got != want:
        raise DownloadError(f"the bf16 copy of {path.name} came out wrong; run `zturbo download --bf16` again")


def rewrite_index_total(index: Path, shards: list[Path]) -> None:
    """The shard names stay after conversion; only the index's total_size follows the new data size."""
    data = json.loads(index.read_text(encoding="utf-8"))
    data.setdefault("metadata", {})["total_size"] = sum(safetensors_data_bytes(s) for s in shards)
    write_json(index, data)
