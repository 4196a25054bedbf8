"""Shared fixtures: the tiny model folder is built once per session in a private cache.

Everything runs offline on CPU. `ZTURBO_HOME` points at a session temp folder so the
builtin model, caches and downloads never touch the user's real cache.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_HOME = tempfile.mkdtemp(prefix="zturbo-test-home-")


def pytest_configure(config):
    os.environ["ZTURBO_HOME"] = _HOME
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_HOME"] = str(Path(_HOME) / "hf")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    import torch

    from zturbo_train.cli import quiet_libraries

    quiet_libraries()
    # The tiny models are far too small for intra-op threads: on 2 cores, OpenMP threads made
    # tiny convolutions ~200x slower. One thread keeps every test fast and deterministic.
    torch.set_num_threads(1)


def pytest_unconfigure(config):
    shutil.rmtree(_HOME, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    """The builtin:tiny diffusers folder."""
    from zturbo_train.testing.tiny import tiny_model_dir

    return tiny_model_dir()


@pytest.fixture(scope="session")
def tiny_adapter() -> Path:
    """The builtin:tiny-adapter safetensors file."""
    from zturbo_train.testing.tiny import tiny_adapter_file

    return tiny_adapter_file()


@pytest.fixture(scope="session")
def tiny_parts(tiny_dir):
    """All tiny parts in fp32, shared read-only across tests: never modify them in place."""
    from zturbo_train.models import load_parts

    return load_parts("builtin:tiny", dtype="fp32")


@pytest.fixture
def tiny_transformer(tiny_dir):
    """A fresh fp32 tiny transformer a test may modify."""
    from zturbo_train.models import load_parts

    return load_parts("builtin:tiny", parts=["transformer"], dtype="fp32").transformer


@pytest.fixture(scope="session")
def example_data() -> Path:
    """The bundled example dataset (read-only: copy it before changing it)."""
    return ROOT / "examples" / "data"


@pytest.fixture
def data_copy(tmp_path, example_data) -> Path:
    """A writable copy of the example dataset."""
    target = tmp_path / "data"
    shutil.copytree(example_data, target)
    return target
