#!/usr/bin/env bash
# The README's first command: sets up this machine and runs Cohort's main job.
#
# Today the main job is what exists of Cohort: it fetches the default base model
# (SmolLM2-135M-Instruct) into the model cache, builds `cohort`, initialises a peer's data
# directory (key + metadata store), shows the peer's identity, and asks the base model a question.
# It grows into `cohort demo` (a whole network on loopback) as the node, rounds and dashboard land.
#
# Environment: COHORT_DATA_DIR (default ~/.cohort) picks the data directory; COHORT_BIN runs an
# already built `cohort` instead of building one (the test of this script uses it).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup-system.sh
scripts/fetch-model.sh

if [ -z "${COHORT_BIN:-}" ]; then
  cargo build --locked -p cohort-peer --bin cohort
  COHORT_BIN="${CARGO_TARGET_DIR:-target}/debug/cohort"
fi
export COHORT_DATA_DIR="${COHORT_DATA_DIR:-$HOME/.cohort}"

peer_id=$("$COHORT_BIN" init)
echo
echo "Cohort peer ready."
echo "  data directory: $COHORT_DATA_DIR"
echo "  peer id:        $peer_id"
echo
echo "Base models in the cache:"
"$COHORT_BIN" model list
echo
question="What is the capital of France?"
echo "Asking the base model: $question"
"$COHORT_BIN" chat --prompt "$question"
echo
echo "Commands available now:"
"$COHORT_BIN" --help | sed -n '/^Commands:/,/^$/p' | sed '1d;$d'
