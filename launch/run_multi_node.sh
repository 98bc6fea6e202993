#!/usr/bin/env bash
# Several nodes through torchrun's c10d rendezvous. Run this once on every node with the
# same MASTER_ADDR/MASTER_PORT (a host every node reaches; the rendezvous store runs
# there) and the same CKPT_DIR on shared storage (NFS, Lustre, or an s3:// URL):
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 NPROC=8 \
#       CKPT_DIR=/shared/run1 launch/run_multi_node.sh --steps 1000 --save-every 100 --async
#
# NODE_RANK is optional: without it, torchrun orders the nodes by arrival. A relaunch with
# another NNODES or NPROC resumes from the newest committed checkpoint, resharded.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
: "${NNODES:?set NNODES, the number of nodes}"
: "${MASTER_ADDR:?set MASTER_ADDR, the host of the rendezvous}"
MASTER_PORT="${MASTER_PORT:-29500}"
NPROC="${NPROC:-1}"
CKPT_DIR="${CKPT_DIR:?set CKPT_DIR, a checkpoint root every node can reach}"
RDZV_ID="${RDZV_ID:-shardsave-train}"
node_rank=()
if [[ -n "${NODE_RANK:-}" ]]; then node_rank=(--node-rank "$NODE_RANK"); fi
exec python -m torch.distributed.run --nnodes "$NNODES" --nproc-per-node "$NPROC" ${node_rank[@]+"${node_rank[@]}"} \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID" \
    "$here/train.py" -- --ckpt-dir "$CKPT_DIR" "$@"
