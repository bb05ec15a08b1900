#!/usr/bin/env bash
# The GPU check: GPT-2-small and a Llama-3.2-1B-shaped model (random bf16 weights, nothing
# downloaded), prefill and greedy decode, eager vs graphopt vs torch.compile vs HF SDPA, as
# shares of the device's peak.  Run it on a machine with one NVIDIA H100/H200 where torch and
# transformers are already installed:
#
#     bash benchmarks/gpu_check.sh                      # writes gpu_check_out/gpu_check.{json,md}
#     bash benchmarks/gpu_check.sh --out DIR --budget-s 420
#     bash benchmarks/gpu_check.sh --dry-run            # tiny sizes on CPU, no GPU needed
#
# It installs only this project (pip install -e ".[hf]" of this repository, without build
# isolation, so an offline machine needs nothing from an index when torch, transformers and
# setuptools are there) and nothing else; the arguments go to benchmarks/gpu_check.py (--help).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python3 -m pip install -q --no-build-isolation -e ".[hf]"
python3 benchmarks/gpu_check.py "$@"
