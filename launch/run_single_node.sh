#!/usr/bin/env bash
# One node, NPROC ranks (default 2), checkpointing into CKPT_DIR; resumes automatically.
#
#   NPROC=4 CKPT_DIR=/data/run1 launch/run_single_node.sh --steps 200 --save-every 20 --async
#
# Extra arguments go to launch/train.py. The "--" keeps torchrun's own parser away from
# them (it would read --log as an abbreviation of its --log-dir).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
NPROC="${NPROC:-2}"
CKPT_DIR="${CKPT_DIR:-/tmp/shardsave-train}"
exec python -m torch.distributed.run --standalone --nproc-per-node "$NPROC" \
    "$here/train.py" -- --ckpt-dir "$CKPT_DIR" "$@"
