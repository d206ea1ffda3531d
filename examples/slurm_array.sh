#!/usr/bin/env bash
# A Slurm job array: 16 independent tasks, one GPU each, no torch.distributed needed.
# Each task writes its shard's features and feats/.shards/report-I-of-16.json; the last task to
# finish merges feats/report.json. A failed task can be resubmitted alone (sbatch --array=5 ...):
# it resumes its shard, and its finish merges the report again.
#SBATCH --job-name=fpn-extract
#SBATCH --array=0-15
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --output=logs/fpn-%A_%a.out
set -euo pipefail
fpn-extract /data/images/ --out /data/feats/ --device cuda \
    --shard "${SLURM_ARRAY_TASK_ID}/${SLURM_ARRAY_TASK_COUNT:-16}" \
    --dtype bfloat16 --save-dtype float16 --quiet
