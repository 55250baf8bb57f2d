#!/usr/bin/env bash
# Issue 12's ablation table on mini:soft (docs/results.md), one row at a time in the order that gives the
# first TARS − GRPO comparison soonest; every row resumes from its last checkpoint and finished pieces are
# skipped, so rerunning this script after a kill continues where it stopped. Run it in the background:
#   nohup bash scripts/mini_soft_table.sh > runs/soft_table.log 2>&1 &
# The base row's evaluation is `tars eval --model mini:soft --data mini:test` (the same EvalConfig as the
# table's): an earlier run of it in runs/soft2_test500 is reused when present.
set -x
cd "$(dirname "$0")/.."
T=".venv/bin/tars experiment mini-table --config configs/mini_soft.yaml --heldout mini:test --out runs/soft_table"
if [ -f runs/soft2_test500/metrics.json ] && [ ! -f runs/soft_table/base/eval/metrics.json ]; then
  mkdir -p runs/soft_table/base && cp -r runs/soft2_test500 runs/soft_table/base/eval
fi
$T --rows base
$T --rows tars --seeds 0
$T --rows grpo --seeds 0
$T --rows grpo_rep --seeds 0
$T --rows grpo_beh --seeds 0
$T --rows tars --seeds 1
$T --rows grpo --seeds 1
$T --rows sft --seeds 0
$T --rows dpo --seeds 0
echo ALLDONE
