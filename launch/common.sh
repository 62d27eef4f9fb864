# shellcheck shell=bash
# Helpers shared by the launch scripts; sourced, with LAUNCHER set to the calling script's name.

die() {
  echo "$LAUNCHER: $*" >&2
  exit 1
}

# need VAR...: fail unless every named environment variable is set.
need() {
  local name
  for name in "$@"; do
    [[ -n "${!name:-}" ]] || die "set $name (see launch/$LAUNCHER --help)"
  done
}

# Quote one word for a POSIX shell: unchanged when it holds only safe characters, else single-quoted.
sq() {
  if [[ -n "$1" && "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Quote a list of words into one command line.
join_quoted() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(sq "$word")"
  done
  printf '%s' "$out"
}

# The project's jax pin (setup.cfg's `jax==X`): the one version every install uses, so jax[tpu] and libtpu
# always match what `pip install` of the project resolves. A JAX_VERSION that differs is refused.
project_jax_version() {
  local root="$1" pinned
  pinned="$(sed -n 's/^[[:space:]]*jax==\([^[:space:]]*\)[[:space:]]*$/\1/p' "$root/setup.cfg" | head -n 1)"
  [[ -n "$pinned" ]] || die "no 'jax==VERSION' pin found in $root/setup.cfg"
  if [[ -n "${JAX_VERSION:-}" && "$JAX_VERSION" != "$pinned" ]]; then
    die "JAX_VERSION=$JAX_VERSION differs from setup.cfg's jax==$pinned; change the pin in setup.cfg (jax and jaxlib) instead, so the project and jax[tpu] agree"
  fi
  printf '%s' "$pinned"
}

# read_env_file FILE: fill ENV_PAIRS with its KEY=VALUE entries, one per line (the value is the rest of the
# line, spaces and all, as xpk's --env-file reads it); a bare KEY takes its value from this environment.
# Blank lines and lines starting with # are skipped; anything else is refused with its line number.
ENV_PAIRS=()
read_env_file() {
  local file="$1" line n=0 key
  ENV_PAIRS=()
  [[ -f "$file" ]] || die "ENV_FILE=$file: no such file"
  while IFS= read -r line || [[ -n "$line" ]]; do
    n=$((n + 1))
    line="${line%$'\r'}"
    [[ -z "${line//[[:space:]]/}" || "$line" =~ ^[[:space:]]*# ]] && continue
    key="${line%%=*}"
    [[ "$key" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] ||
      die "ENV_FILE=$file line $n: expected KEY=VALUE (KEY: letters, digits, _), got '$line'"
    if [[ "$line" == *=* ]]; then
      ENV_PAIRS+=("$line")
    else
      [[ -n "${!key+x}" ]] || die "ENV_FILE=$file line $n: $key has no value here (write $key=VALUE)"
      ENV_PAIRS+=("$key=${!key}")
    fi
  done <"$file"
}

# TRAIN_ENV split KEY=VALUE pairs on spaces, which broke values holding spaces (LIBTPU_INIT_ARGS=--a --b).
refuse_train_env() {
  [[ -z "${TRAIN_ENV:-}" ]] ||
    die "TRAIN_ENV is replaced by ENV_FILE: a file with one KEY=VALUE per line (values may hold spaces)"
}
