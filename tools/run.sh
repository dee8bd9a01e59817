#!/usr/bin/env bash
# The main job on embedded defaults: the codec demo (distortion vs the paper's bounds), then the
# real-model evaluation (SmolLM2-135M shipped in a PyPI package, GPL-3 text shipped by Debian).
# Tables and plots land in out/.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/setup.sh
"$VPY" -m turboquant_codec info
"$VPY" -m turboquant_codec demo --out out "$@"
"$VPY" -m turboquant_torch.eval --out out
