#!/usr/bin/env bash
# experiments/pinned.sh COMMIT WORKTREE RUNS [driver args...]
#
# The study driver (experiments/lite_cpu.py) from a git worktree pinned to COMMIT, so that what a long row
# trains never changes with later edits of this checkout: the driver puts its own checkout's src/ first on
# the path, and provenance.json records that commit. WORKTREE is created at COMMIT, or reused when it is
# already there (at that commit, else this stops). RUNS holds the run folders; the report is left to a
# later `--report-only` (rows running side by side would race on it). Low priority, one thread unless
# OMP_NUM_THREADS says otherwise. Start it in the background and call it again after a session ends: the
# driver skips what is finished and resumes the rest from their last.ckpt.
#   nohup experiments/pinned.sh HEAD ../wt-rows ../runs/lite_cpu --rows lora_box_full_s42 > rows.log 2>&1 &
set -euo pipefail
[ $# -ge 3 ] || { echo "usage: $0 COMMIT WORKTREE RUNS [driver args...]" >&2; exit 2; }
repo=$(cd "$(dirname "$0")/.." && pwd)
commit=$(git -C "$repo" rev-parse --verify --quiet "$1^{commit}") \
  || { echo "error: $1 is not a commit of $repo; give a commit, a branch or HEAD" >&2; exit 2; }
wt=$(realpath -m "$2") runs=$(realpath -m "$3")
shift 3
if [ -e "$wt" ]; then
  at=$(git -C "$wt" rev-parse HEAD 2>/dev/null || echo "not a git worktree")
  [ "$at" = "$commit" ] || { echo "error: $wt is at $at, not $commit; give another WORKTREE" >&2; exit 2; }
else
  git -C "$repo" worktree add --detach "$wt" "$commit" > /dev/null
fi
export MALLOC_ARENA_MAX=2 NO_ALBUMENTATIONS_UPDATE=1 WANDB_MODE=${WANDB_MODE:-disabled}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
echo "[pinned] $(date -u +%FT%TZ) ${commit:0:10} in $wt: $*"
# from here, not from the worktree: relative paths among the driver's arguments mean what they meant here
nice -n 5 python "$wt/experiments/lite_cpu.py" --runs "$runs" --no-report "$@"
