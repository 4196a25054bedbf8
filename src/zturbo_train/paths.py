"""Where zturbo keeps things: `$ZTURBO_HOME` (default ~/.cache/zturbo) and the folders under it.

<home>/models/<owner>--<name>/   what `zturbo download` writes (and model references look in first)
<home>/builtin/                  builtin:tiny and its adapter, built on first use
<home>/cache/                    latent and caption caches shared by runs
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """Where zturbo keeps builtin models and downloads (`ZTURBO_HOME`, default ~/.cache/zturbo)."""
    return Path(os.environ.get("ZTURBO_HOME", Path.home() / ".cache" / "zturbo")).expanduser()


def download_dir(repo_id: str) -> Path:
    """The folder `zturbo download` writes a Hub repo into (and the loader looks in first)."""
    return cache_root() / "models" / repo_id.replace("/", "--")


def builtin_dir() -> Path:
    """Where builtin:tiny and its adapter are built."""
    return cache_root() / "builtin"


def default_cache_dir() -> Path:
    """Where caches live unless a caller says otherwise: `$ZTURBO_HOME/cache`."""
    return cache_root() / "cache"
