#!/usr/bin/env bash
# The README's second command: every check and every test, from a fresh clone.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup-system.sh
# The default base model (cached outside the repository): the real-model tests need it.
scripts/fetch-model.sh

cargo fmt --all --check
cargo clippy --locked --workspace --all-targets -- -D warnings
cargo nextest run --locked --workspace --no-fail-fast
