#!/usr/bin/env bash
# Run blt_jax on a Cloud TPU VM slice: every host (worker) of the slice runs the same `blt train` (or
# `blt prepare`) command, and jax finds the other hosts by itself. See launch/README.md for a walkthrough.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu_vm.sh COMMAND [ARGS...]

commands
  create [GCLOUD_ARGS...]   create the TPU VM slice (extra args go to `gcloud compute tpus tpu-vm create`)
  setup                     copy or clone the repo to every worker, make a venv, install jax[tpu] and blt_jax;
                            with BUCKET set, also install gcsfuse and mount the bucket(s), as `mount` does
  mount                     install gcsfuse if needed and mount BUCKET at MOUNT_ROOT/BUCKET on every worker
                            (mounts do not survive a restart: run it again after one)
  check                     on every worker, start jax.distributed as `blt` does and print the process index,
                            process count, local and global device counts
  train BLT_TRAIN_ARGS...   start `blt train BLT_TRAIN_ARGS...` in the background on every worker
  prepare BLT_PREPARE_ARGS...
                            start `blt prepare BLT_PREPARE_ARGS...` the same way: each worker tokenises its
                            share of the files and computes its share of the entropies
  logs [JOB] [-f] [WORKER|all]
                            show (or follow) a worker's log of JOB, train or prepare (default: the job started
                            last; worker 0)
  status                    the slice's state, and which job runs on each worker
  stop                      stop the job on every worker (SIGTERM: training saves a checkpoint and exits; SIGKILL
                            after STOP_TIMEOUT seconds), then wait until no process holds the TPU
  run CMD...                run CMD in the repo folder with the venv active, on $WORKER (default: all)
  delete [GCLOUD_ARGS...]   delete the slice (extra args go to `gcloud compute tpus tpu-vm delete`)

configuration (environment variables)
  TPU_NAME          slice name (required)
  ZONE              zone, e.g. us-east5-a (required)
  PROJECT           Google Cloud project (default: gcloud's configured project)
  ACCELERATOR       accelerator type for create: v5p-256, v6e-64, v5litepod-16 (v5e), v4-32, ... (required
                    by create)
  RUNTIME_VERSION   TPU software version (default from ACCELERATOR: v5p -> v2-alpha-tpuv5,
                    v6e -> v2-alpha-tpuv6e, v5litepod -> v2-alpha-tpuv5-lite, v2/v3/v4 -> tpu-ubuntu2204-base)
  SPOT=1            create a Spot slice (--spot);  PREEMPTIBLE=1: a preemptible one (--preemptible)
  REPO_URL          git URL to clone on the workers; unset: the local checkout (tracked and untracked,
                    not ignored files) is packed and copied with `gcloud compute tpus tpu-vm scp --worker=all`
  REPO_REF          branch, tag or commit to check out after cloning (default: the remote's default branch)
  REMOTE_DIR        repo folder on the workers (default: blt_jax; relative paths are under the home folder)
  VENV              venv folder on the workers (default: blt-venv)
  LOG_DIR           log folder on the workers (default: blt-logs)
  PYTHON_VERSION    Python for the venv, fetched by uv if the image lacks it (default: 3.11)
  BUCKET            Cloud Storage bucket name(s) to mount with gcsfuse (space-separated, without gs://)
  MOUNT_ROOT        where the buckets are mounted (default: /gcs, so runs go to --run /gcs/BUCKET/runs/...)
  ENV_FILE          a file of KEY=VALUE lines exported for the jobs (the value is the rest of the line,
                    spaces included; a bare KEY takes this shell's value), e.g. LIBTPU_INIT_ARGS=--xla_a --xla_b
  WORKER            worker(s) for `run`: all, or an index (default: all)
  LOG_LINES         lines shown by `logs` (default: 100)
  STOP_TIMEOUT      seconds `stop` waits for the job to exit before SIGKILL, and for the TPU (default: 60)
  GCLOUD_SSH_ARGS   extra flags for every `tpu-vm ssh`/`scp`, e.g. "--internal-ip"
  jax[tpu] is installed at setup.cfg's jax pin, so the project and libtpu always agree; JAX_VERSION, if set,
  must equal it (to change versions, change the pin).

example
  export TPU_NAME=blt-v5p ZONE=us-east5-a ACCELERATOR=v5p-256 BUCKET=my-bucket
  launch/tpu_vm.sh create --spot
  launch/tpu_vm.sh setup
  launch/tpu_vm.sh train --what blt --preset fast-blt-1b --store gs://my-bucket/data \
      --run /gcs/my-bucket/runs/b1
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
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v5e-*) die "ACCELERATOR=$1: Cloud TPU names v5e slices v5litepod-N (e.g. v5litepod-16)" ;;
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    *) die "no default runtime for ACCELERATOR=$1; set RUNTIME_VERSION" ;;
  esac
}

REMOTE_DIR="${REMOTE_DIR:-blt_jax}"
VENV="${VENV:-blt-venv}"
LOG_DIR="${LOG_DIR:-blt-logs}"
PYTHON_VERSION="${PYTHON_VERSION:-3.11}"
STOP_TIMEOUT="${STOP_TIMEOUT:-60}"
MOUNT_ROOT="${MOUNT_ROOT:-/gcs}"
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
  printf 'TPU_LOCKFILE=%s\n' "$(sq "${TPU_LOCKFILE:-/tmp/libtpu_lockfile}")"
  cat <<'EOS'
case "$REMOTE_DIR" in /*) ;; *) REMOTE_DIR="$HOME/$REMOTE_DIR" ;; esac
case "$VENV" in /*) ;; *) VENV="$HOME/$VENV" ;; esac
case "$LOG_DIR" in /*) ;; *) LOG_DIR="$HOME/$LOG_DIR" ;; esac
PIDFILE="$LOG_DIR/job.pid"
JOBFILE="$LOG_DIR/job.name"
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

check_buckets() {
  local bucket
  for bucket in ${BUCKET:-}; do
    [[ "$bucket" =~ ^[a-z0-9][a-z0-9._-]*$ ]] || die "BUCKET: '$bucket' is not a bucket name (give it without gs://)"
  done
}

# The remote lines that install gcsfuse (Google's apt repository) if needed and mount each of $BUCKET.
mount_script() {
  printf 'BUCKETS=%s MOUNT_ROOT=%s\n' "$(sq "$BUCKET")" "$(sq "$MOUNT_ROOT")"
  cat <<'EOS'
if ! command -v gcsfuse >/dev/null 2>&1; then
  CODENAME="$(lsb_release -c -s)"
  echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-$CODENAME main" |
    sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
  sudo apt-get update -qq
  sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcsfuse
fi
for B in $BUCKETS; do
  MNT="$MOUNT_ROOT/$B"
  if mountpoint -q "$MNT"; then
    echo "$(hostname): gs://$B is mounted at $MNT"
    continue
  fi
  sudo mkdir -p "$MNT"
  sudo chown "$(id -u):$(id -g)" "$MNT"
  # implicit dirs: folders that other hosts (or gsutil) created exist here too
  gcsfuse --implicit-dirs "$B" "$MNT"
  echo "$(hostname): gs://$B mounted at $MNT"
done
EOS
}

cmd_mount() {
  need BUCKET
  check_buckets
  tpu_ssh all "$(remote_prelude)"$'\n'"$(mount_script)"
}

cmd_setup() {
  local jax_version fetch
  jax_version="$(project_jax_version "$REPO_ROOT")"
  check_buckets
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
  script+="$(printf 'JAX_VERSION=%s PYTHON_VERSION=%s\n' "$(sq "$jax_version")" "$(sq "$PYTHON_VERSION")")"$'\n'
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
# one resolve: jax[tpu] at the project's own pin (setup.cfg), so libtpu matches the jax the project needs
"$VENV/bin/python" -m pip install --quiet "jax[tpu]==$JAX_VERSION" -e "$REMOTE_DIR"
"$VENV/bin/python" "$REMOTE_DIR/launch/check_install.py"
echo "$(hostname): $("$VENV/bin/python" --version), jax $("$VENV/bin/python" -c 'import jax; print(jax.__version__)') ready"
EOS
  )"
  if [[ -n "${BUCKET:-}" ]]; then
    script+=$'\n'"$(mount_script)"
  fi
  tpu_ssh all "$script"
}

cmd_check() {
  local script
  script="$(remote_prelude)"$'\n'
  # the start-up `blt train` uses (jax.distributed on a pod), then what jax sees
  script+="\"\$VENV/bin/python\" -c 'from blt_jax import distributed; distributed.initialize(); import jax; print(jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())'"
  echo "each worker prints: process_index process_count local_devices global_devices"
  tpu_ssh all "$script"
}

# start_job JOB ARGS...: `blt JOB ARGS...` in the background on every worker, with ENV_FILE's variables.
start_job() {
  local job="$1"
  shift
  refuse_train_env
  local exports="" pair
  if [[ -n "${ENV_FILE:-}" ]]; then
    read_env_file "$ENV_FILE"
    for pair in ${ENV_PAIRS[@]+"${ENV_PAIRS[@]}"}; do
      exports+="export ${pair%%=*}=$(sq "${pair#*=}")"$'\n'
    done
  fi
  local script
  script="$(remote_prelude)"$'\n'
  # the same command line on every worker; `blt` is found on PATH in the venv
  script+="JOB=$(sq "$job") JOB_CMD=$(sq "$(join_quoted blt "$job" "$@")")"$'\n'
  script+="$(
    cat <<'EOS'
mkdir -p "$LOG_DIR"
if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
  echo "$(hostname): $(cat "$JOBFILE" 2>/dev/null || echo a job) already runs (pid $(cat "$PIDFILE")); use stop first" >&2
  exit 1
fi
W="$(curl -sf --max-time 5 -H Metadata-Flavor:Google \
  http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number 2>/dev/null ||
  hostname)"
LOG="$LOG_DIR/$JOB-worker$W.log"
cd "$REMOTE_DIR"
PATH="$VENV/bin:$PATH"
export PATH
EOS
  )"$'\n'
  script+="$exports"
  script+="$(
    cat <<'EOS'
echo "== $(date -u +%FT%TZ) $JOB_CMD" >>"$LOG"
eval "set -- $JOB_CMD"
# its own session and process group (stop signals the whole group), immune to the ssh hang-up
setsid nohup "$@" >>"$LOG" 2>&1 </dev/null &
echo "$!" >"$PIDFILE"
echo "$JOB" >"$JOBFILE"
echo "$(hostname) (worker $W): started $JOB, pid $!, log $LOG"
EOS
  )"
  tpu_ssh all "$script"
}

cmd_train() {
  [[ $# -gt 0 ]] || die "train needs the arguments of \`blt train\`, e.g. --preset fast-blt-1b --store gs://... --run /gcs/BUCKET/runs/..."
  start_job train "$@"
}

cmd_prepare() {
  [[ $# -gt 0 ]] || die "prepare needs the arguments of \`blt prepare\`, e.g. --preset fast-blt-1b --data /gcs/BUCKET/corpus --store gs://BUCKET/data"
  start_job prepare "$@"
}

cmd_logs() {
  local follow=0 worker=0 job="" lines="${LOG_LINES:-100}"
  while [[ $# -gt 0 ]]; do
    case "$1" in
      -f | --follow) follow=1 ;;
      train | prepare) job="$1" ;;
      all | [0-9]*) worker="$1" ;;
      *) die "logs: unexpected argument '$1'" ;;
    esac
    shift
  done
  [[ "$lines" =~ ^[0-9]+$ ]] || die "LOG_LINES must be a number, got '$lines'"
  local script
  script="$(remote_prelude)"$'\n'
  script+="JOB=$(sq "$job") LOG_LINES=$(sq "$lines")"$'\n'
  # shellcheck disable=SC2016 # the remote shell expands these
  script+='[ -n "$JOB" ] || JOB="$(cat "$JOBFILE" 2>/dev/null || echo train)"'$'\n'
  # shellcheck disable=SC2016
  if [[ "$follow" == 1 ]]; then
    script+='exec tail -n "$LOG_LINES" -F "$LOG_DIR"/"$JOB"-worker*.log'
  else
    script+='tail -v -n "$LOG_LINES" "$LOG_DIR"/"$JOB"-worker*.log'
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
  JOB="$(cat "$JOBFILE" 2>/dev/null || echo job)"
  echo "$(hostname): $JOB running (pid $(cat "$PIDFILE")): $(tail -n 1 "$LOG_DIR"/"$JOB"-worker*.log 2>/dev/null | cut -c1-160)"
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
  # the job leads its own process group (setsid), which holds any data-loader children; on SIGTERM training
  # saves a checkpoint and exits
  kill -TERM -- "-$PID" 2>/dev/null || true
  i=0
  while kill -0 "$PID" 2>/dev/null && [ "$i" -lt "$STOP_TIMEOUT" ]; do sleep 1; i=$((i + 1)); done
  kill -KILL -- "-$PID" 2>/dev/null || true
  i=0
  while kill -0 "$PID" 2>/dev/null && [ "$i" -lt 10 ]; do sleep 1; i=$((i + 1)); done
  rm -f "$PIDFILE"
fi
# the TPU is free once no process holds its device files (a new job would fail to open it otherwise)
holders() {
  DEVICES="$(ls /dev/accel* /dev/vfio/[0-9]* 2>/dev/null || true)"
  if [ -n "$DEVICES" ] && command -v lsof >/dev/null 2>&1; then
    # shellcheck disable=SC2086
    lsof -t $DEVICES 2>/dev/null | sort -u | tr '\n' ' '
  fi
}
i=0
HELD="$(holders)"
while [ -n "$HELD" ] && [ "$i" -lt "$STOP_TIMEOUT" ]; do sleep 1; i=$((i + 1)); HELD="$(holders)"; done
if [ -n "$HELD" ]; then
  echo "$(hostname): the TPU is still held by pid(s) $HELD, not started by this script; stop them" >&2
  exit 1
fi
# a killed process leaves libtpu's lock file behind, and the next job would wait on it
rm -f "$TPU_LOCKFILE" 2>/dev/null || sudo rm -f "$TPU_LOCKFILE"
echo "$(hostname): stopped, TPU free"
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
    create | setup | mount | check | train | prepare | logs | status | stop | run | delete) ;;
    *) die "unknown command '$command' (see launch/tpu_vm.sh --help)" ;;
  esac
  init_gcloud_flags
  "cmd_$command" "$@"
}

main "$@"
