#!/usr/bin/env bash
# The README's second command: every check and every test, from a fresh clone.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup-system.sh

cargo fmt --all --check
cargo clippy --locked --workspace --all-targets -- -D warnings
cargo nextest run --locked --workspace --no-fail-fast
