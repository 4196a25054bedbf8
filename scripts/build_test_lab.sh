#!/usr/bin/env bash
# Remake tests/lab/built, the lab the claim tests (tests/lab/test_claims.py) run on: what
# `zturbo lab build` makes with the default settings (~8 min on a 2-core CPU; deterministic on
# the CPU, so the same code gives the same lab). Run it after changing lab/build.py or
# lab/concepts.py; test_committed_lab_matches_the_build_code says when it is due.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf tests/lab/built
zturbo lab build tests/lab/built
du -sh tests/lab/built
