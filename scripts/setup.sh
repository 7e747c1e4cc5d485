#!/usr/bin/env bash
# Set up .venv on a fresh machine: torch first (pinned, so pip does not pull a multi-GB CUDA build),
# then this package with matplotlib for the demo's plots and aiohttp + sphn for `serve`. `setup.sh test` adds the
# test extras, the moshi oracle (installed --no-deps: its own pins conflict with transformers 5, see
# docs/design.md §4), Debian's Chromium with its driver for the web page's browser tests and espeak-ng for the corpus
# generator's tests (`synthesize`).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
"${pip[@]}" --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || "${pip[@]}" "torch==2.13.0"
if [ "${1:-}" = "test" ]; then
  "${pip[@]}" -e ".[test]"
  "${pip[@]}" --no-deps "moshi==0.2.13" einops
  if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null || ! command -v espeak-ng >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver espeak-ng >/dev/null
  fi
else
  "${pip[@]}" -e ".[plots,serve]"
fi
