#!/usr/bin/env bash
# Run blt_jax as an xpk workload on a GKE cluster with TPU slices (one slice or several: multi-slice).
# xpk starts one container per TPU VM host, each running the same `blt train` command; jax finds the other
# hosts and slices by itself. See launch/README.md.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/xpk.sh COMMAND [ARGS...]

commands
  build                     build launch/Dockerfile from this checkout as $DOCKER_IMAGE and push it
  create BLT_TRAIN_ARGS...  submit a workload running `blt train BLT_TRAIN_ARGS...` on every host;
                            with NUM_SLICES > 1 it adds --set mesh.dcn_parallelism=[NUM_SLICES,1,1]
                            (data parallel across slices) unless the arguments set mesh.dcn_parallelism
  delete [XPK_ARGS...]      delete the workload $WORKLOAD
  list [XPK_ARGS...]        list the cluster's workloads

configuration (environment variables)
  CLUSTER         GKE cluster made by `xpk cluster create` (required)
  WORKLOAD        workload name, lowercase letters, digits and dashes (required by create and delete)
  PROJECT         Google Cloud project (default: gcloud's configured project)
  ZONE            cluster zone (default: gcloud's configured compute/zone)
  TPU_TYPE        TPU type of one slice, e.g. v5p-256, v6e-256 (required by create)
  NUM_SLICES      number of slices (default: 1)
  DOCKER_IMAGE    image with blt_jax installed, e.g. us-docker.pkg.dev/PROJECT/REPO/blt_jax:TAG
                  (required by build and create)
  MAX_RESTARTS    times the workload is restarted after a failure or preemption (default: 0); each
                  restart resumes from the run's latest checkpoint
  PRIORITY        very-low, low, medium, high or very-high (default: xpk's, medium)
  TRAIN_ENV       space-separated KEY=VALUE pairs, passed as `xpk --env` to the containers
  XPK_ARGS        extra flags for `xpk workload create`, e.g. "--restart-on-user-code-failure"
  DRY_RUN=1       pass --dry-run to xpk (print what it would do)

example (2 x v5p-256, data parallel across the slices, FSDP within each)
  export CLUSTER=blt-cluster WORKLOAD=blt-1b-a ZONE=us-east5-a TPU_TYPE=v5p-256 NUM_SLICES=2
  export DOCKER_IMAGE=us-docker.pkg.dev/my-project/blt/blt_jax:latest
  launch/xpk.sh build
  launch/xpk.sh create --what blt --preset fast-blt-1b --store gs://BUCKET/data --run /gcs/BUCKET/runs/b1 \
      --set mesh.ici_parallelism='[1,-1,1]'
  launch/xpk.sh list
  launch/xpk.sh delete
EOF
}

LAUNCHER=xpk.sh
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

NUM_SLICES="${NUM_SLICES:-1}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
XPK_FLAGS=()

init_xpk_flags() {
  XPK_FLAGS=()
  if [[ -n "${PROJECT:-}" ]]; then XPK_FLAGS+=(--project="$PROJECT"); fi
  if [[ -n "${ZONE:-}" ]]; then XPK_FLAGS+=(--zone="$ZONE"); fi
  if [[ "${DRY_RUN:-0}" == 1 ]]; then XPK_FLAGS+=(--dry-run); fi
}

cmd_build() {
  need DOCKER_IMAGE
  set -x
  docker build -f "$REPO_ROOT/launch/Dockerfile" -t "$DOCKER_IMAGE" "$REPO_ROOT"
  docker push "$DOCKER_IMAGE"
}

cmd_create() {
  need CLUSTER WORKLOAD TPU_TYPE DOCKER_IMAGE
  [[ $# -gt 0 ]] || die "create needs the arguments of \`blt train\`, e.g. --preset fast-blt-1b --store gs://... --run /gcs/BUCKET/runs/..."
  [[ "$NUM_SLICES" =~ ^[1-9][0-9]*$ ]] || die "NUM_SLICES must be a positive integer, got '$NUM_SLICES'"
  local args=("$@") arg has_dcn=0
  for arg in "$@"; do
    if [[ "$arg" == *mesh.dcn_parallelism* ]]; then has_dcn=1; fi
  done
  if [[ "$NUM_SLICES" -gt 1 && "$has_dcn" == 0 ]]; then
    # data parallel across slices: only gradients cross the data-centre network
    args+=(--set "mesh.dcn_parallelism=[$NUM_SLICES,1,1]")
  fi
  local command
  command="$(join_quoted blt train "${args[@]}")"

  local extra=() envs=() pair
  if [[ -n "${TRAIN_ENV:-}" ]]; then
    read -r -a envs <<<"$TRAIN_ENV"
    for pair in "${envs[@]}"; do
      [[ "$pair" == [A-Za-z_]*=* ]] || die "TRAIN_ENV entries must be KEY=VALUE, got '$pair'"
      extra+=(--env "$pair")
    done
  fi
  if [[ -n "${MAX_RESTARTS:-}" ]]; then extra+=(--max-restarts="$MAX_RESTARTS"); fi
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
    build | create | delete | list) ;;
    *) die "unknown command '$command' (see launch/xpk.sh --help)" ;;
  esac
  init_xpk_flags
  "cmd_$command" "$@"
}

main "$@"
