#!/usr/bin/env bash
# Run blt_jax as an xpk workload on a GKE cluster with TPU slices (one slice or several: multi-slice).
# xpk starts one container per TPU VM host, each running the same `blt train` (or `blt prepare`) command;
# jax finds the other hosts and slices by itself. See launch/README.md.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/xpk.sh COMMAND [ARGS...]

commands
  build                     build launch/Dockerfile from this checkout (linux/amd64) as $DOCKER_IMAGE, push it
  storage [XPK_ARGS...]     attach the bucket $BUCKET to the cluster as the gcsfuse storage $STORAGE, mounted
                            at MOUNT_POINT in the workloads that name it (once per cluster)
  create BLT_TRAIN_ARGS...  submit a workload running `blt train BLT_TRAIN_ARGS...` on every host;
                            with NUM_SLICES > 1 it adds --set mesh.dcn_parallelism=[NUM_SLICES,1,1]
                            (data parallel across slices) unless the arguments set mesh.dcn_parallelism
  prepare BLT_PREPARE_ARGS...
                            submit a workload running `blt prepare BLT_PREPARE_ARGS...` on every host (each
                            tokenises its share of the files and computes its share of the entropies)
  delete [XPK_ARGS...]      delete the workload $WORKLOAD
  list [XPK_ARGS...]        list the cluster's workloads

configuration (environment variables)
  CLUSTER         GKE cluster made by `xpk cluster create` (required)
  WORKLOAD        workload name: a lowercase letter, then lowercase letters, digits and dashes, not ending
                  in a dash, at most 40 characters (required by create, prepare and delete)
  PROJECT         Google Cloud project (default: gcloud's configured project)
  ZONE            cluster zone (default: gcloud's configured compute/zone)
  TPU_TYPE        TPU type of one slice, e.g. v5p-256, v6e-256, v5litepod-256 (required by create, prepare)
  NUM_SLICES      number of slices (default: 1)
  DOCKER_IMAGE    image with blt_jax installed, e.g. us-docker.pkg.dev/PROJECT/REPO/blt_jax:TAG
                  (required by build, create and prepare)
  STORAGE         xpk storage the workload mounts (see `storage`; required by create and prepare: without
                  it each container would write its checkpoints to its own disk, lost when the pod ends)
  BUCKET          bucket for `storage` (a name, without gs://)
  MOUNT_POINT     where `storage` mounts the bucket in the containers (default: /gcs/$BUCKET)
  STORAGE_SIZE_GB size declared for the gcsfuse volume by `storage` (default: 1; xpk requires one)
  MAX_RESTARTS    times the workload is restarted after a failure or preemption (default: 0); each restart
                  resumes from the run's latest checkpoint (see "restarts" below)
  PRIORITY        very-low, low, medium, high or very-high (default: xpk's, medium)
  ENV_FILE        a file of KEY=VALUE lines passed as xpk --env-file (the value is the rest of the line,
                  spaces included: LIBTPU_INIT_ARGS=--xla_a --xla_b; no " or \ in values)
  XPK_ARGS        extra flags for `xpk workload create`, e.g. "--reservation=NAME"
  DRY_RUN=1       pass --dry-run to xpk (print what it would do)

restarts (MAX_RESTARTS > 0): xpk restarts a workload whose container exits with 42 or 127-255 (killed by
a signal); this script adds --restart-on-exit-codes=75,1: 75 is `blt`'s status after SIGTERM (a checkpoint
was saved: GKE's preemption or eviction notice), 1 an uncaught exception (on a pod usually the echo of
another host failing). Status 2 (a bad flag, config or input, reported in one line) ends the workload.

example (2 x v5p-256, data parallel across the slices, FSDP within each)
  export CLUSTER=blt-cluster WORKLOAD=blt-1b-a ZONE=us-east5-a TPU_TYPE=v5p-256 NUM_SLICES=2
  export DOCKER_IMAGE=us-docker.pkg.dev/my-project/blt/blt_jax:latest STORAGE=blt-bucket BUCKET=my-bucket
  launch/xpk.sh build
  launch/xpk.sh storage
  MAX_RESTARTS=10 launch/xpk.sh create --what blt --preset fast-blt-1b --store gs://my-bucket/data \
      --run /gcs/my-bucket/runs/b1 --set mesh.ici_parallelism='[1,-1,1]'
  launch/xpk.sh list
  launch/xpk.sh delete
EOF
}

LAUNCHER=xpk.sh
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# Exit statuses of `blt` (blt_jax/exit_codes.py) on which a workload restarts, on top of xpk's own 42 and
# 127-255: INTERRUPTED (75, SIGTERM handled: checkpoint saved) and CRASHED (1). ERROR (2) never restarts.
RESTART_EXIT_CODES="75,1"

NUM_SLICES="${NUM_SLICES:-1}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
XPK_FLAGS=()

init_xpk_flags() {
  XPK_FLAGS=()
  if [[ -n "${PROJECT:-}" ]]; then XPK_FLAGS+=(--project="$PROJECT"); fi
  if [[ -n "${ZONE:-}" ]]; then XPK_FLAGS+=(--zone="$ZONE"); fi
  if [[ "${DRY_RUN:-0}" == 1 ]]; then XPK_FLAGS+=(--dry-run); fi
}

# xpk's rule for workload names (Kubernetes names): refused here, before anything is submitted.
check_workload_name() {
  [[ "$WORKLOAD" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    die "WORKLOAD=$WORKLOAD: must start with a lowercase letter, hold only lowercase letters, digits and dashes, and not end in a dash"
  [[ ${#WORKLOAD} -le 40 ]] || die "WORKLOAD=$WORKLOAD: ${#WORKLOAD} characters, at most 40 allowed"
}

cmd_build() {
  need DOCKER_IMAGE
  set -x
  # TPU hosts are x86-64: build for them whatever this machine is
  docker build --platform linux/amd64 -f "$REPO_ROOT/launch/Dockerfile" -t "$DOCKER_IMAGE" "$REPO_ROOT"
  docker push "$DOCKER_IMAGE"
}

cmd_storage() {
  need CLUSTER STORAGE BUCKET
  [[ "$BUCKET" =~ ^[a-z0-9][a-z0-9._-]*$ ]] || die "BUCKET: '$BUCKET' is not a bucket name (give it without gs://)"
  set -x
  xpk storage attach "$STORAGE" --type=gcsfuse --cluster="$CLUSTER" --bucket="$BUCKET" \
    --mount-point="${MOUNT_POINT:-/gcs/$BUCKET}" --readonly=false --auto-mount=false \
    --size="${STORAGE_SIZE_GB:-1}" ${XPK_FLAGS[@]+"${XPK_FLAGS[@]}"} "$@"
}

# submit JOB ARGS...: a workload running `blt JOB ARGS...` in every container.
submit() {
  local job="$1"
  shift
  need CLUSTER WORKLOAD TPU_TYPE DOCKER_IMAGE STORAGE
  check_workload_name
  refuse_train_env
  [[ "$NUM_SLICES" =~ ^[1-9][0-9]*$ ]] || die "NUM_SLICES must be a positive integer, got '$NUM_SLICES'"
  local args=("$@") arg has_dcn=0
  for arg in "$@"; do
    if [[ "$arg" == *mesh.dcn_parallelism* ]]; then has_dcn=1; fi
  done
  if [[ "$job" == train && "$NUM_SLICES" -gt 1 && "$has_dcn" == 0 ]]; then
    # data parallel across slices: only gradients cross the data-centre network
    args+=(--set "mesh.dcn_parallelism=[$NUM_SLICES,1,1]")
  fi
  local command
  command="$(join_quoted blt "$job" "${args[@]}")"

  local extra=() name pair
  for name in $STORAGE; do extra+=(--storage="$name"); done
  if [[ -n "${ENV_FILE:-}" ]]; then
    read_env_file "$ENV_FILE"  # refuse a malformed file here rather than in xpk
    for pair in ${ENV_PAIRS[@]+"${ENV_PAIRS[@]}"}; do
      [[ "$pair" != *[\"\\]* ]] || die "ENV_FILE=$ENV_FILE: ${pair%%=*}'s value holds \" or \\, which xpk cannot pass"
    done
    extra+=(--env-file="$ENV_FILE")
  fi
  if [[ -n "${MAX_RESTARTS:-}" ]]; then
    [[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]] || die "MAX_RESTARTS must be a number, got '$MAX_RESTARTS'"
    extra+=(--max-restarts="$MAX_RESTARTS")
    if [[ "$MAX_RESTARTS" -gt 0 ]]; then extra+=(--restart-on-exit-codes="$RESTART_EXIT_CODES"); fi
  fi
  if [[ -n "${PRIORITY:-}" ]]; then extra+=(--priority="$PRIORITY"); fi
  if [[ -n "${XPK_ARGS:-}" ]]; then
    local more=()
    read -r -a more <<<"$XPK_ARGS"
    extra+=("${more[@]}")
  fi

  set -x
  xpk workload create \
    --cluster="$CLUSTER" \
    --workload="$WORKLOAD" \
    --tpu-type="$TPU_TYPE" \
    --num-slices="$NUM_SLICES" \
    --docker-image="$DOCKER_IMAGE" \
    --command="$command" \
    ${XPK_FLAGS[@]+"${XPK_FLAGS[@]}"} ${extra[@]+"${extra[@]}"}
}

cmd_create() {
  [[ $# -gt 0 ]] || die "create needs the arguments of \`blt train\`, e.g. --preset fast-blt-1b --store gs://... --run /gcs/BUCKET/runs/..."
  submit train "$@"
}

cmd_prepare() {
  [[ $# -gt 0 ]] || die "prepare needs the arguments of \`blt prepare\`, e.g. --preset fast-blt-1b --data /gcs/BUCKET/corpus --store gs://BUCKET/data"
  submit prepare "$@"
}

cmd_delete() {
  need CLUSTER WORKLOAD
  set -x
  xpk workload delete --cluster="$CLUSTER" --workload="$WORKLOAD" ${XPK_FLAGS[@]+"${XPK_FLAGS[@]}"} "$@"
}

cmd_list() {
  need CLUSTER
  set -x
  xpk workload list --cluster="$CLUSTER" ${XPK_FLAGS[@]+"${XPK_FLAGS[@]}"} "$@"
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
    build | storage | create | prepare | delete | list) ;;
    *) die "unknown command '$command' (see launch/xpk.sh --help)" ;;
  esac
  init_xpk_flags
  "cmd_$command" "$@"
}

main "$@"
