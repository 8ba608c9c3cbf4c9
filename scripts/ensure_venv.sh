#!/usr/bin/env bash
# Creates .venv with the pinned stack if it is missing, and reinstalls when a
# pin changes (deps stamp) or the package's build inputs change (project stamp).
set -euo pipefail
venv=${1:-.venv}
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}

hash_of() { cat "$@" 2>/dev/null | sha256sum | cut -d' ' -f1; }

deps_hash=$(hash_of requirements.txt requirements-nodeps.txt)
project_files=(pyproject.toml)
[ -f CMakeLists.txt ] && project_files+=(CMakeLists.txt)
[ -d csrc ] && while IFS= read -r f; do project_files+=("$f"); done < <(find csrc -type f | sort)
project_hash=$(hash_of "${project_files[@]}")

if [ ! -x "$venv/bin/python" ]; then
  echo "creating $venv"
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
if [ "$(cat "$venv/.deps-stamp" 2>/dev/null)" != "$deps_hash" ]; then
  echo "installing the pinned stack into $venv (a few minutes, ~7.6 GB)"
  "${pip[@]}" -r requirements.txt 2> >(grep -v "is ignored: it is neither" >&2)
  "${pip[@]}" --no-deps -r requirements-nodeps.txt 2> >(grep -v "is ignored: it is neither" >&2)
  echo "$deps_hash" > "$venv/.deps-stamp"
  rm -f "$venv/.project-stamp"
fi
if [ "$(cat "$venv/.project-stamp" 2>/dev/null)" != "$project_hash" ]; then
  echo "installing xla-qops into $venv"
  "${pip[@]}" --no-deps --no-build-isolation -e . 2> >(grep -v "is ignored: it is neither" >&2)
  echo "$project_hash" > "$venv/.project-stamp"
fi
