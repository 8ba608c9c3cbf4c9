#!/usr/bin/env bash
# Creates a virtual environment with one of the project's stacks if it is
# missing, and reinstalls when a pin changes (deps stamp) or the package's
# build inputs change (project stamp).
#
#   scripts/ensure_venv.sh [VENV] [STACK]
#
# STACK "pinned" (default; VENV .venv): the torch_xla stack of requirements.txt
#   and requirements-nodeps.txt, on python3 ($PYTHON overrides).
# STACK "current" (VENV .venv-current): the newest JAX and torch of
#   requirements-current.txt (torch face without torch_xla), on Python 3.12.
# STACK "jax" (VENV .venv-jax): the newest JAX of requirements-jax.txt, no
#   torch, on Python 3.12.
# STACK "torchax" (VENV .venv-torchax): requirements-torchax.txt, the newest
#   torchax on the newest torch it imports on, with the newest JAX.
# Both >= 3.12 stacks: $PYTHON_JAX overrides; otherwise python3.12 on the PATH
#   or in pyenv, else a newer 3.x the same way.
set -euo pipefail
venv=${1:-.venv}
stack=${2:-pinned}
cd "$(dirname "$0")/.."

hash_of() { cat "$@" 2>/dev/null | sha256sum | cut -d' ' -f1; }

# A Python >= 3.12 for the jax stack (JAX >= 0.11 needs it), 3.12 preferred.
find_python312() {
  local candidates=() root="" minor
  [ -n "${PYTHON_JAX:-}" ] && candidates+=("$PYTHON_JAX")
  command -v pyenv >/dev/null 2>&1 && root=$(pyenv root)
  for minor in 12 13 14; do
    candidates+=("python3.$minor")
    [ -n "$root" ] && while IFS= read -r p; do candidates+=("$p"); done < <(
      ls -d "$root"/versions/3."$minor".*/bin/python3 2>/dev/null | sort -rV)
  done
  local c
  for c in "${candidates[@]}"; do
    if "$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; then
      echo "$c"
      return 0
    fi
  done
  echo "ensure_venv.sh: the jax stack needs Python >= 3.12; none found (tried" \
       "${candidates[*]}); set PYTHON_JAX to one" >&2
  return 1
}

case "$stack" in
  pinned)
    python=${PYTHON:-python3}
    dep_files=(requirements.txt requirements-nodeps.txt) ;;
  current)
    python=$(find_python312)
    dep_files=(requirements-current.txt) ;;
  jax)
    python=$(find_python312)
    dep_files=(requirements-jax.txt) ;;
  torchax)
    python=$(find_python312)
    dep_files=(requirements-torchax.txt) ;;
  *)
    echo "ensure_venv.sh: STACK must be 'pinned', 'current', 'jax' or 'torchax', got '$stack'" >&2
    exit 2 ;;
esac

deps_hash=$(hash_of "${dep_files[@]}")
project_files=(pyproject.toml)
[ -f CMakeLists.txt ] && project_files+=(CMakeLists.txt)
[ -d csrc ] && while IFS= read -r f; do project_files+=("$f"); done < <(find csrc -type f | sort)
project_hash=$(hash_of "${project_files[@]}")

if [ ! -x "$venv/bin/python" ]; then
  echo "creating $venv ($("$python" --version 2>&1))"
  "$python" -m venv "$venv"
fi
# --no-cache-dir: the stacks' wheels (torch and its CUDA libraries, ~5 GB per
# stack) would otherwise be kept a second time in pip's cache; a fresh CI
# machine ran out of disk that way.
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir)
quiet_pip() { "${pip[@]}" "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
# Refuses to start an install that cannot finish: pip's "No space left on
# device" comes minutes in, after a half-written venv.
require_free_gb() {
  local need=$1 have
  have=$(df -Pk "$venv" | awk 'NR == 2 { print int($4 / 1048576) }')
  if [ "$have" -lt "$need" ]; then
    echo "ensure_venv.sh: installing the $stack stack into $venv needs about" \
         "$need GB free on its disk; $have GB are free (df -h $venv)" >&2
    exit 1
  fi
}
if [ "$(cat "$venv/.deps-stamp" 2>/dev/null)" != "$deps_hash" ]; then
  # Only a first install needs the whole stack's room; an update replaces pins.
  [ -f "$venv/.deps-stamp" ] || case "$stack" in
    pinned) require_free_gb 9 ;; current | torchax) require_free_gb 7 ;; jax) require_free_gb 1 ;;
  esac
  if [ "$stack" = pinned ]; then
    echo "installing the pinned stack into $venv (a few minutes, ~7.6 GB)"
    quiet_pip -r requirements.txt
    quiet_pip --no-deps -r requirements-nodeps.txt
  elif [ "$stack" = current ] || [ "$stack" = torchax ]; then
    echo "installing the $stack stack into $venv (a few minutes, ~6.3 GB)"
    quiet_pip -r "requirements-$stack.txt"
  else
    echo "installing the current-JAX stack into $venv (a minute, ~0.6 GB)"
    quiet_pip -r requirements-jax.txt
  fi
  echo "$deps_hash" > "$venv/.deps-stamp"
  rm -f "$venv/.project-stamp"
fi
if [ "$(cat "$venv/.project-stamp" 2>/dev/null)" != "$project_hash" ]; then
  echo "installing xla-qops into $venv"
  # The current stack shares .venv-jax's wheel tag (cp312) but builds the torch
  # operator against another torch: its own build tree keeps the two from
  # reconfiguring each other's.
  build_dir=()
  [ "$stack" = current ] || [ "$stack" = torchax ] &&
    build_dir=(-C "build-dir=build/{wheel_tag}-$stack")
  quiet_pip --no-deps --no-build-isolation "${build_dir[@]}" -e .
  echo "$project_hash" > "$venv/.project-stamp"
fi
