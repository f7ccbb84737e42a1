#!/usr/bin/env bash
# The main job on the embedded defaults: Phuong & Lampert distillation vs the CE baseline on
# Fashion-MNIST (quick recipe), tracked under runs/, then the budget/accuracy curves from the runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
SEED=${SEED:-1}
$PY experiments/multiexit_distillation.py with quick seed="$SEED"
$PY experiments/multiexit_distillation.py with quick seed="$SEED" distillation=False
$PY -m analysis curves runs --experiment multiexit_distillation --out figures/multiexit_distillation
echo "demo: budget/accuracy plot at figures/multiexit_distillation/budgeted.png (anytime: anytime.png)"
