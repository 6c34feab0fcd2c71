#!/usr/bin/env bash
# Install the project into the active virtual environment with uv, which downloads, unpacks and byte-compiles
# the wheels in parallel: about 45 s on 2 cores against pip's 150 s. `pip install -e .` installs the same
# project, more slowly.
#
#   ./install.sh          # the study
#   ./install.sh test     # the study and the test tools (the extras in pyproject.toml, comma-separated)
set -euo pipefail

if [ -z "${VIRTUAL_ENV:-}" ]; then
  echo "install.sh: no virtual environment is active; run 'python3 -m venv .venv && . .venv/bin/activate' first" >&2
  exit 2
fi
cd "$(dirname "$0")"
target=.
if [ $# -gt 0 ]; then
  case "$1" in
    *[!a-z0-9,_-]*) echo "install.sh: extras '$1' must be names from pyproject.toml's optional-dependencies, comma-separated (e.g. test)" >&2; exit 2 ;;
  esac
  target=".[$1]"
fi

python -m pip install -q uv
# uv does not read pip's settings. A machine whose pip finds wheels in a local folder (PIP_FIND_LINKS or pip's
# find-links setting: where a CPU build of torch may lie) gets the same folder, so that both pick the same torch.
links="${PIP_FIND_LINKS:-$(python -m pip config get global.find-links 2>/dev/null || true)}"
find_links=()
for folder in $links; do
  find_links+=(--find-links "$folder")
done
# Compiled now, in parallel, rather than by every process that imports them (or never, under
# PYTHONDONTWRITEBYTECODE, where each Ray worker would compile torch's modules again).
# (The ${...+...} form: bash 3.2, macOS's, calls an empty array unbound under set -u.)
uv pip install --compile-bytecode ${find_links[@]+"${find_links[@]}"} -e "$target"
