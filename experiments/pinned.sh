#!/usr/bin/env bash
# Run a long experiment on the committed blt_jax (HEAD), not on the working tree, so edits made while it
# trains cannot change or break it midway:
#
#   experiments/pinned.sh [--pidfile FILE] [--commit REV] COMMAND...
#   experiments/pinned.sh --pidfile runs/experiments.pids nice -n 15 .venv/bin/python experiments/scaling.py
#
# HEAD's (or REV's) blt_jax/ is exported once to runs/lib/<commit>/ (git-ignored; `git archive`, the checkout is
# not touched) and put first on PYTHONPATH; results record the commit (experiments/common.library_version).
# Runs that share a data store or feed each other (the study, then the best models) should share a REV.
# The command replaces this shell (exec), so the PID appended to --pidfile is the command's own: SIGSTOP /
# SIGCONT pause and resume it, SIGTERM makes the trainer save a checkpoint and exit.
set -euo pipefail
cd "$(dirname "$0")/.."
pidfile="" rev="HEAD"
while [[ "${1:-}" == --pidfile || "${1:-}" == --commit ]]; do
  if [[ "$1" == --pidfile ]]; then pidfile="$2"; else rev="$2"; fi
  shift 2
done
[[ $# -gt 0 ]] || { echo "usage: experiments/pinned.sh [--pidfile FILE] [--commit REV] COMMAND..." >&2; exit 2; }
commit="$(git rev-parse --short "$rev^{commit}")" || { echo "pinned.sh: no commit $rev" >&2; exit 2; }
lib="runs/lib/$commit"
if [[ ! -f "$lib/blt_jax/COMMIT" ]]; then
  mkdir -p "$lib.tmp"
  git archive "$commit" blt_jax | tar -x -C "$lib.tmp"
  echo "$commit" > "$lib.tmp/blt_jax/COMMIT"
  rm -rf "$lib" && mv "$lib.tmp" "$lib"
fi
export PYTHONPATH="$PWD/$lib${PYTHONPATH:+:$PYTHONPATH}"
[[ -n "$pidfile" ]] && echo $$ >> "$pidfile"
exec "$@"
