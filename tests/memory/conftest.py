"""The real Z-Image shape, shared by the tests in tests/memory."""

from __future__ import annotations

import pytest

from zturbo_train.memory.estimate import ModelShape, shape_from_config
from zturbo_train.testing.synthetic import ZIMAGE_CONFIG


@pytest.fixture(scope="module")
def real_shape() -> ModelShape:
    """Z-Image Turbo's parameter counts, from its config on the meta device."""
    return shape_from_config(ZIMAGE_CONFIG)
