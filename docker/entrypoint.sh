#!/usr/bin/env bash
# Container entry point. Arguments go to train.py (Hydra overrides):
#   docker run ... memoryformer:latest experiment=mf_tiny data=pile_pythia trainer=deepspeed_zero2
# First argument `evaluate` runs evaluate.py instead; `flops` the FLOPs tool; `bash` (or any executable)
# runs that command:
#   docker run ... memoryformer:latest evaluate checkpoint=/outputs/run/checkpoints/last.ckpt
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."  # the repository root: /workspace/memoryformer in the image
case "${1:-}" in
  evaluate) shift; exec python evaluate.py hydra.run.dir=/outputs/eval/\${now:%Y-%m-%d_%H-%M-%S} "$@" ;;
  flops)    shift; exec python benchmarks/paper_flops.py "$@" ;;
  train)    shift; exec python train.py hydra.run.dir=/outputs/train/\${now:%Y-%m-%d_%H-%M-%S} "$@" ;;
  "")       exec python train.py hydra.run.dir=/outputs/train/\${now:%Y-%m-%d_%H-%M-%S} ;;
  -*|*=*)   exec python train.py hydra.run.dir=/outputs/train/\${now:%Y-%m-%d_%H-%M-%S} "$@" ;;
  *)        exec "$@" ;;
esac
