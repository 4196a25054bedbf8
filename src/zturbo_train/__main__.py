"""`python -m zturbo_train ...` (also what torchrun launches)."""

from .cli import run

run()
