"""Model, adapter and Hub references, parsed once.

A reference is one of: `builtin:NAME` (built in code, for tests), `none` (no adapter), an
adapter alias (`v1`, `v2`), a Hub repo id `owner/name`, a Hub file
`owner/name/file.safetensors`, or a local path. A local path that exists always wins, so
these parsers only answer "what would this string be if it is not a local file".
"""

from __future__ import annotations

import re

from .zimage import ADAPTER_ALIASES

BUILTIN = "builtin:"
WEIGHT_SUFFIX = ".safetensors"
# huggingface_hub's rule for repo ids: owner and name of letters, digits, `-`, `_`, `.`; no `..`.
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_builtin(ref: str) -> bool:
    return ref.startswith(BUILTIN)


def is_repo_id(ref: str) -> bool:
    """`owner/name` as the Hub spells repo ids."""
    return bool(_REPO_ID.fullmatch(ref)) and ".." not in ref


def hub_file(ref: str) -> tuple[str, str] | None:
    """(repo id, file name) of an adapter alias or `owner/name/file.safetensors`; None for anything else."""
    full = ADAPTER_ALIASES.get(ref, ref)
    repo, _, filename = full.rpartition("/")
    if filename.endswith(WEIGHT_SUFFIX) and filename != WEIGHT_SUFFIX and repo.count("/") == 1 and is_repo_id(repo):
        return repo, filename
    return None
