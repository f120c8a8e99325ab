#!/usr/bin/env bash
# The README's first command: sets up this machine and runs Cohort's main job, `cohort demo`.
#
# It installs what the build needs, fetches the default base model (SmolLM2-135M-Instruct) into
# the model cache, builds `cohort`, and starts a whole Cohort network on 127.0.0.1: a data owner
# with two datanets (one private), a contributor, a job owner and volunteers, who run a federated
# LoRA job; it prints the dashboard's address, each round's validation loss and the credits, and
# keeps serving the dashboard, chat and the OpenAI-compatible API until Ctrl-C.
#
# Arguments go to `cohort demo`: `--quick` runs on a tiny generated model (about a minute),
# `--dir DIR` keeps the peers' data directories, `--http 127.0.0.1:PORT` fixes the dashboard's
# port. COHORT_BIN runs an already built `cohort` instead of building one (the test of this
# script uses it).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup-system.sh
scripts/fetch-model.sh

if [ -z "${COHORT_BIN:-}" ]; then
  cargo build --locked -p cohort-peer --bin cohort
  COHORT_BIN="${CARGO_TARGET_DIR:-target}/debug/cohort"
fi

exec "$COHORT_BIN" demo "$@"
