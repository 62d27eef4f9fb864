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
