#!/usr/bin/env bash
# DIKI paper tables (arXiv 2407.05342): MTIL order I, order II and MTIL-FS, {zero-shot, continual FT (ZSCL's
# recipe), ZSCL, MoE-Adapters, DIKI} x 3 seeds each (45 runs), then mean ± std beside the available published
# numbers, each row with its protocol. Extra args
# go to every sweep, e.g.  scripts/reproduce_diki.sh hydra/launcher=submitit_slurm hydra.launcher.gpus_per_node=1
# resume=true: re-running the script finishes an interrupted sweep and skips finished runs.
set -euo pipefail
for table in diki_mtil diki_mtil_order2 diki_mtil_fewshot; do clcli train +sweep="$table" resume=true "$@"; done
clcli table outputs/sweeps/diki --output outputs/sweeps/diki/table.md --plot outputs/sweeps/diki/table.png
