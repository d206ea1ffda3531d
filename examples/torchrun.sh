#!/usr/bin/env bash
# One machine, all its GPUs: one process per GPU, each on cuda:LOCAL_RANK with its own shard of the
# images; rank 0 merges one feats/report.json after the final barrier (nccl; gloo on CPU-only hosts).
set -euo pipefail
GPUS=${GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}
torchrun --standalone --nproc_per_node "${GPUS:-1}" --no-python \
    fpn-extract images/ --out feats/ --dtype bfloat16 --save-dtype float16

# Several machines: run this on each of NODES hosts, with the same rendezvous endpoint:
#   torchrun --nnodes "$NODES" --nproc_per_node 8 --rdzv_backend c10d \
#       --rdzv_endpoint "$HEAD_HOST:29500" --rdzv_id feats-job --no-python \
#       fpn-extract /shared/images/ --out /shared/feats/
# (inputs and --out on a filesystem that every host sees)
