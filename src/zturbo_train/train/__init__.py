"""Training: the step (hot path), the loop, resumable state, distributed ranks, dry run."""
