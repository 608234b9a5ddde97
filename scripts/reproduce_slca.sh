#!/usr/bin/env bash
# SLCA paper tables (arXiv 2303.05118): IN21k and MoCo v3 blocks, 3 class-order seeds each (96 runs),
# then mean ± std beside the paper's numbers. Extra args go to both sweeps, e.g.
#   scripts/reproduce_slca.sh hydra/launcher=joblib hydra.launcher.n_jobs=2
# resume=true: re-running the script finishes an interrupted sweep and skips finished runs.
set -euo pipefail
for table in slca_in21k slca_mocov3; do clcli train +sweep="$table" resume=true "$@"; done
clcli table outputs/sweeps/slca --output outputs/sweeps/slca/table.md --plot outputs/sweeps/slca/table.png
