#!/usr/bin/env bash
# The README's second command: every check and every test, from a fresh clone.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup-system.sh --tests
# The default base model (cached outside the repository): the real-model tests need it.
scripts/fetch-model.sh

# Playwright for the dashboard's browser tests (tests/browser, pinned by its package-lock.json).
(cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)

cargo fmt --all --check
cargo clippy --locked --workspace --all-targets -- -D warnings
cargo nextest run --locked --workspace --no-fail-fast
