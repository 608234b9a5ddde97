#!/usr/bin/env bash
# SLCA paper tables (arXiv 2303.05118): IN21k and MoCo v3 blocks, 3 class-order seeds each (96 runs), and
# the prompt baselines of its comparison, L2P / DualPrompt / CODA-P with and without SLCA's classifier
# alignment (144 runs, docs/prompt_baselines.md), then one table, mean ± std beside the paper's numbers.
# Extra args go to every sweep, e.g.
#   scripts/reproduce_slca.sh hydra/launcher=joblib hydra.launcher.n_jobs=2
# resume=true: re-running the script finishes an interrupted sweep and skips finished runs.
set -euo pipefail
for table in slca_in21k slca_mocov3 prompts_in21k prompts_mocov3; do clcli train +sweep="$table" resume=true "$@"; done
clcli table outputs/sweeps/slca --output outputs/sweeps/slca/table.md --plot outputs/sweeps/slca/table.png
