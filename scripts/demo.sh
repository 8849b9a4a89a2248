#!/usr/bin/env bash
# Fresh machine -> demo: set up .venv, then train a LoKr on the embedded tiny HiDream (CPU, a minute or two).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m trainer_core demo --out "${DEMO_OUT:-output/demo}" "$@"
