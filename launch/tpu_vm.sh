#!/usr/bin/env bash
# Run blt_jax on a Cloud TPU VM slice: every host (worker) of the slice runs the same `blt train` command,
# and jax finds the other hosts by itself. See launch/README.md for a walkthrough.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu_vm.sh COMMAND [ARGS...]

commands
  create [GCLOUD_ARGS...]   create the TPU VM slice (extra args go to `gcloud compute tpus tpu-vm create`)
  setup                     copy or clone the repo to every worker, make a venv, install jax[tpu] and blt_jax
  check                     print jax's process index and device count on every worker
  train BLT_TRAIN_ARGS...   start `blt train BLT_TRAIN_ARGS...` in the background on every worker
  logs [-f] [WORKER|all]    show (or follow) the training log of a worker (default: worker 0)
  status                    the slice's state, and whether training runs on each worker
  stop                      stop training on every worker (SIGTERM, then SIGKILL after STOP_TIMEOUT seconds)
  run CMD...                run CMD in the repo folder with the venv active, on $WORKER (default: all)
  delete [GCLOUD_ARGS...]   delete the slice (extra args go to `gcloud compute tpus tpu-vm delete`)

configuration (environment variables)
  TPU_NAME          slice name (required)
  ZONE              zone, e.g. us-east5-a (required)
  PROJECT           Google Cloud project (default: gcloud's configured project)
  ACCELERATOR       accelerator type for create, e.g. v5p-256, v6e-64 (required by create)
  RUNTIME_VERSION   TPU software version (default from ACCELERATOR: v5p -> v2-alpha-tpuv5,
                    v6e -> v2-alpha-tpuv6e, v5litepod -> v2-alpha-tpuv5-lite, v2/v3/v4 -> tpu-ubuntu2204-base)
  SPOT=1            create a Spot slice (--spot);  PREEMPTIBLE=1: a preemptible one (--preemptible)
  REPO_URL          git URL to clone on the workers; unset: the local checkout (tracked and untracked,
                    not ignored files) is packed and copied with `gcloud compute tpus tpu-vm scp --worker=all`
  REPO_REF          branch, tag or commit to check out after cloning (default: the remote's default branch)
  REMOTE_DIR        repo folder on the workers (default: blt_jax; relative paths are under the home folder)
  VENV              venv folder on the workers (default: blt-venv)
  LOG_DIR           log folder on the workers (default: blt-logs)
  JAX_VERSION       jax[tpu] version to install (default: 0.10.2, the project's pin)
  PYTHON_VERSION    Python for the venv, fetched by uv if the image lacks it (default: 3.11)
  TRAIN_ENV         space-separated KEY=VALUE pairs set for the training processes, e.g. "LIBTPU_INIT_ARGS=..."
  WORKER            worker(s) for `run`: all, or an index (default: all)
  LINES             lines shown by `logs` (default: 100)
  STOP_TIMEOUT      seconds `stop` waits before SIGKILL (default: 60)
  GCLOUD_SSH_ARGS   extra flags for every `tpu-vm ssh`/`scp`, e.g. "--internal-ip"

example
  export TPU_NAME=blt-v5p ZONE=us-east5-a ACCELERATOR=v5p-256
  launch/tpu_vm.sh create --spot
  launch/tpu_vm.sh setup
  launch/tpu_vm.sh train --what blt --preset fast-blt-1b --store gs://BUCKET/data --run /gcs/BUCKET/runs/b1
  launch/tpu_vm.sh logs -f
  launch/tpu_vm.sh delete
EOF
}

LAUNCHER=tpu_vm.sh
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

default_runtime() {
  case "$1" in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    *) die "no default runtime for ACCELERATOR=$1; set RUNTIME_VERSION" ;;
  esac
}

REMOTE_DIR="${REMOTE_DIR:-blt_jax}"
VENV="${VENV:-blt-venv}"
LOG_DIR="${LOG_DIR:-blt-logs}"
JAX_VERSION="${JAX_VERSION:-0.10.2}"
PYTHON_VERSION="${PYTHON_VERSION:-3.11}"
STOP_TIMEOUT="${STOP_TIMEOUT:-60}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

GCLOUD_FLAGS=()
SSH_EXTRA=()
TARBALL=""

init_gcloud_flags() {
  need TPU_NAME ZONE
  GCLOUD_FLAGS=(--zone="$ZONE")
  if [[ -n "${PROJECT:-}" ]]; then
    GCLOUD_FLAGS+=(--project="$PROJECT")
  fi
  if [[ -n "${GCLOUD_SSH_ARGS:-}" ]]; then
    read -r -a SSH_EXTRA <<<"$GCLOUD_SSH_ARGS"
  fi
}

# Shell lines defining the remote paths as absolute paths, prefixed to every remote script.
remote_prelude() {
  printf 'set -eu\n'
  printf 'REMOTE_DIR=%s VENV=%s LOG_DIR=%s\n' "$(sq "$REMOTE_DIR")" "$(sq "$VENV")" "$(sq "$LOG_DIR")"
  cat <<'EOS'
case "$REMOTE_DIR" in /*) ;; *) REMOTE_DIR="$HOME/$REMOTE_DIR" ;; esac
case "$VENV" in /*) ;; *) VENV="$HOME/$VENV" ;; esac
case "$LOG_DIR" in /*) ;; *) LOG_DIR="$HOME/$LOG_DIR" ;; esac
PIDFILE="$LOG_DIR/train.pid"
EOS
}

# tpu_ssh WORKER SCRIPT: run SCRIPT with bash on WORKER (an index or "all").
tpu_ssh() {
  local worker="$1" script="$2"
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_FLAGS[@]}" ${SSH_EXTRA[@]+"${SSH_EXTRA[@]}"} \
    --worker="$worker" --command="bash -c $(sq "$script")"
}

cmd_create() {
  need ACCELERATOR
  local version="${RUNTIME_VERSION:-}"
  [[ -n "$version" ]] || version="$(default_runtime "$ACCELERATOR")"
  local extra=()
  if [[ "${SPOT:-0}" == 1 ]]; then extra+=(--spot); fi
  if [[ "${PREEMPTIBLE:-0}" == 1 ]]; then extra+=(--preemptible); fi
  set -x
  gcloud compute tpus tpu-vm create "$TPU_NAME" "${GCLOUD_FLAGS[@]}" \
    --accelerator-type="$ACCELERATOR" --version="$version" ${extra[@]+"${extra[@]}"} "$@"
}

cmd_setup() {
  local fetch
  if [[ -n "${REPO_URL:-}" ]]; then
    fetch="$(printf 'REPO_URL=%s REPO_REF=%s\n' "$(sq "$REPO_URL")" "$(sq "${REPO_REF:-}")")"
    fetch+=$'\n'
    fetch+="$(
      cat <<'EOS'
if [ -d "$REMOTE_DIR/.git" ]; then
  git -C "$REMOTE_DIR" fetch --quiet origin
  if [ -n "$REPO_REF" ]; then git -C "$REMOTE_DIR" checkout --quiet "$REPO_REF"; fi
  git -C "$REMOTE_DIR" pull --quiet --ff-only 2>/dev/null || true
else
  rm -rf "$REMOTE_DIR"
  git clone --quiet "$REPO_URL" "$REMOTE_DIR"
  if [ -n "$REPO_REF" ]; then git -C "$REMOTE_DIR" checkout --quiet "$REPO_REF"; fi
fi
EOS
    )"
  else
    git -C "$REPO_ROOT" rev-parse --git-dir >/dev/null 2>&1 ||
      die "$REPO_ROOT is not a git checkout; set REPO_URL instead"
    TARBALL="$(mktemp "${TMPDIR:-/tmp}/blt_jax_src.XXXXXX")"
    trap 'rm -f "$TARBALL"' EXIT
    # tracked and untracked files that git does not ignore, as they are in the working tree
    (cd "$REPO_ROOT" && git ls-files -z --cached --others --exclude-standard |
      while IFS= read -r -d '' f; do if [[ -f "$f" ]]; then printf '%s\0' "$f"; fi; done |
      COPYFILE_DISABLE=1 tar --null -T - -czf "$TARBALL")
    echo "copying $(du -h "$TARBALL" | cut -f1) of sources from $REPO_ROOT to every worker"
    gcloud compute tpus tpu-vm scp "$TARBALL" "$TPU_NAME:blt_jax_src.tar.gz" --worker=all \
      "${GCLOUD_FLAGS[@]}" ${SSH_EXTRA[@]+"${SSH_EXTRA[@]}"}
    fetch="$(
      cat <<'EOS'
rm -rf "$REMOTE_DIR"
mkdir -p "$REMOTE_DIR"
tar -xzf "$HOME/blt_jax_src.tar.gz" -C "$REMOTE_DIR"
rm -f "$HOME/blt_jax_src.tar.gz"
EOS
    )"
  fi
  local script
  script="$(remote_prelude)"$'\n'
  script+="$(printf 'JAX_VERSION=%s PYTHON_VERSION=%s\n' "$(sq "$JAX_VERSION")" "$(sq "$PYTHON_VERSION")")"$'\n'
  script+="$fetch"$'\n'
  script+="$(
    cat <<'EOS'
if [ ! -x "$VENV/bin/python" ]; then
  # TPU VM images may ship an older Python than the project's 3.11; uv fetches the requested one if needed.
  export PATH="$HOME/.local/bin:$PATH"
  command -v uv >/dev/null 2>&1 || curl -LsSf https://astral.sh/uv/install.sh | sh >/dev/null
  uv venv --quiet --seed --python "$PYTHON_VERSION" "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "jax[tpu]==$JAX_VERSION"
"$VENV/bin/python" -m pip install --quiet -e "$REMOTE_DIR"
"$VENV/bin/blt" --help >/dev/null
echo "$(hostname): $("$VENV/bin/python" --version), jax $("$VENV/bin/python" -c 'import jax; print(jax.__version__)') ready"
EOS
  )"
  tpu_ssh all "$script"
}

cmd_check() {
  local script
  script="$(remote_prelude)"$'\n'
  script+="\"\$VENV/bin/python\" -c 'import jax; print(jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())'"
  echo "each worker prints: process_index process_count local_devices global_devices"
  tpu_ssh all "$script"
}

cmd_train() {
  [[ $# -gt 0 ]] || die "train needs the arguments of \`blt train\`, e.g. --preset fast-blt-1b --store gs://... --run /gcs/BUCKET/runs/..."
  local envs=() pair
  if [[ -n "${TRAIN_ENV:-}" ]]; then
    read -r -a envs <<<"$TRAIN_ENV"
    for pair in "${envs[@]}"; do
      [[ "$pair" == [A-Za-z_]*=* ]] || die "TRAIN_ENV entries must be KEY=VALUE, got '$pair'"
    done
  fi
  local script
  script="$(remote_prelude)"$'\n'
  # the same command line on every worker; `blt` is found on PATH in the venv
  script+="TRAIN_CMD=$(sq "$(join_quoted env ${envs[@]+"${envs[@]}"} blt train "$@")")"$'\n'
  script+="$(
    cat <<'EOS'
mkdir -p "$LOG_DIR"
if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
  echo "$(hostname): training already runs (pid $(cat "$PIDFILE")); use stop first" >&2
  exit 1
fi
W="$(curl -sf --max-time 5 -H Metadata-Flavor:Google \
  http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number 2>/dev/null ||
  hostname)"
LOG="$LOG_DIR/train-worker$W.log"
cd "$REMOTE_DIR"
PATH="$VENV/bin:$PATH"
export PATH
echo "== $(date -u +%FT%TZ) $TRAIN_CMD" >>"$LOG"
eval "set -- $TRAIN_CMD"
# its own session and process group (stop signals the whole group), immune to the ssh hang-up
setsid nohup "$@" >>"$LOG" 2>&1 </dev/null &
echo "$!" >"$PIDFILE"
echo "$(hostname) (worker $W): started pid $!, log $LOG"
EOS
  )"
  tpu_ssh all "$script"
}

cmd_logs() {
  local follow=0 worker=0 lines="${LINES:-100}"
  while [[ $# -gt 0 ]]; do
    case "$1" in
      -f | --follow) follow=1 ;;
      all | [0-9]*) worker="$1" ;;
      *) die "logs: unexpected argument '$1'" ;;
    esac
    shift
  done
  local script
  script="$(remote_prelude)"$'\n'
  if [[ "$follow" == 1 ]]; then
    script+="exec tail -n $(sq "$lines") -F \"\$LOG_DIR\"/train-worker*.log"
  else
    script+="tail -v -n $(sq "$lines") \"\$LOG_DIR\"/train-worker*.log"
  fi
  tpu_ssh "$worker" "$script"
}

cmd_status() {
  gcloud compute tpus tpu-vm describe "$TPU_NAME" "${GCLOUD_FLAGS[@]}" \
    --format='table(name.basename(), state, acceleratorType, runtimeVersion, health)'
  local script
  script="$(remote_prelude)"$'\n'
  script+="$(
    cat <<'EOS'
if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
  echo "$(hostname): running (pid $(cat "$PIDFILE")): $(tail -n 1 "$LOG_DIR"/train-worker*.log 2>/dev/null | cut -c1-160)"
else
  echo "$(hostname): not running"
fi
EOS
  )"
  tpu_ssh all "$script"
}

cmd_stop() {
  local script
  script="$(remote_prelude)"$'\n'
  script+="STOP_TIMEOUT=$(sq "$STOP_TIMEOUT")"$'\n'
  script+="$(
    cat <<'EOS'
if [ -f "$PIDFILE" ]; then
  PID="$(cat "$PIDFILE")"
  # the training process leads its own process group (setsid), which holds any data-loader children
  kill -TERM -- "-$PID" 2>/dev/null || true
  i=0
  while kill -0 "$PID" 2>/dev/null && [ "$i" -lt "$STOP_TIMEOUT" ]; do sleep 1; i=$((i + 1)); done
  kill -KILL -- "-$PID" 2>/dev/null || true
  rm -f "$PIDFILE"
fi
# anything started outside this script (the bracket keeps pkill from matching this shell)
pkill -TERM -f '/bin/[b]lt train' 2>/dev/null || true
sleep 2
pkill -KILL -f '/bin/[b]lt train' 2>/dev/null || true
echo "$(hostname): stopped"
EOS
  )"
  tpu_ssh all "$script"
}

cmd_run() {
  [[ $# -gt 0 ]] || die "run needs a command"
  local script
  script="$(remote_prelude)"$'\n'
  script+="cd \"\$REMOTE_DIR\"; PATH=\"\$VENV/bin:\$PATH\"; export PATH"$'\n'
  script+="$(join_quoted "$@")"
  tpu_ssh "${WORKER:-all}" "$script"
}

cmd_delete() {
  set -x
  gcloud compute tpus tpu-vm delete "$TPU_NAME" "${GCLOUD_FLAGS[@]}" "$@"
}

main() {
  [[ $# -gt 0 ]] || {
    usage >&2
    exit 2
  }
  local command="$1"
  shift
  case "$command" in
    -h | --help | help)
      usage
      return 0
      ;;
    create | setup | check | train | logs | status | stop | run | delete) ;;
    *) die "unknown command '$command' (see launch/tpu_vm.sh --help)" ;;
  esac
  init_gcloud_flags
  "cmd_$command" "$@"
}

main "$@"
