#!/usr/bin/env bash
# Create or reuse the project's environment, install this clone into it, then check that it works.
#
# Two layers:
#   - the pinned stack (requirements.txt, detectron2) is built once into a cache outside the clone,
#     keyed on requirements.txt, the Python version and D2_SOURCE: a second run, or a fresh clone on a
#     machine that already built it, downloads nothing;
#   - .venv is this clone's own small virtual environment: it sees the cached stack's site-packages
#     (through a .pth file) and holds an editable install of this clone (`pip install -e .`), so two
#     clones sharing the cache never run each other's code.
#
#   CROSSMAE_CACHE  where environments and downloads are kept (default ~/.cache/crossmae-vitdet)
#   D2_SOURCE       what to install detectron2 from, e.g. a detectron2 source checkout or
#                   'git+https://github.com/facebookresearch/detectron2.git' (GPU route);
#                   empty: the registry's pb1-detectron2==0.6, Python files only.
#   PYTHON          the interpreter to build the environment with (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."

SETUP_VERSION=1  # bump when the cached stack's install steps change
LAYER_VERSION=1  # bump when the per-clone layer's steps change
PYTHON=${PYTHON:-python3}
CACHE=${CROSSMAE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/crossmae-vitdet}
D2_SOURCE=${D2_SOURCE:-}

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  echo "setup: '$PYTHON' is missing or older than Python 3.10; set PYTHON=/path/to/python3.10+" >&2
  exit 1
fi
key=$( { echo "$SETUP_VERSION"; cat requirements.txt; echo "$D2_SOURCE"; "$PYTHON" -c 'import sys; print(sys.version)'; } \
  | sha256sum | cut -c1-16)
BASE="$CACHE/venv-$key"
LAYER_STAMP=".venv/.crossmae-layer"
stamp="$LAYER_VERSION $BASE $(sha256sum pyproject.toml | cut -c1-16) $PWD"

if [ -e .venv ] && [ ! -L .venv ] && [ ! -f "$LAYER_STAMP" ]; then
  echo "setup: .venv is a directory this set-up did not make; move it away (mv .venv .venv.old) and rerun" >&2
  exit 1
fi
if [ -f "$BASE/.setup-complete" ] && [ -f "$LAYER_STAMP" ] && [ "$(cat "$LAYER_STAMP")" = "$stamp" ]; then
  exit 0  # nothing changed since the last set-up of this clone
fi

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9  # one build at a time per cache
if [ ! -f "$BASE/.setup-complete" ]; then
  echo "setup: building the environment in $BASE (first run: downloads about 5 GB, a few minutes)"
  rm -rf "$BASE"
  "$PYTHON" -m venv "$BASE"
  # Ignore pip configuration files and find-links: a machine-local CPU-only torch wheel there
  # shadows the registry build, and torchvision's compiled ops do not load against it.
  pip() { env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null "$BASE/bin/python" -m pip "$@"; }
  # pip 26 refuses pb1-detectron2's sdist (an extra declares a direct URL); 25.2 downloads it.
  pip install -q --disable-pip-version-check "pip==25.2"
  pip install -q -r requirements.txt

  if [ -n "$D2_SOURCE" ]; then
    echo "setup: installing detectron2 from $D2_SOURCE (builds its C++/CUDA extension)"
    pip install -q --no-build-isolation "$D2_SOURCE"
  else
    echo "setup: installing detectron2 v0.6 (pb1-detectron2, Python files only; see detection/compat.py)"
    mkdir -p "$CACHE/sdist"
    sdist=$(ls "$CACHE"/sdist/pb1-detectron2-0.6.tar.gz 2>/dev/null || true)
    if [ -z "$sdist" ]; then
      # Its setup.py imports torch, hence --no-build-isolation once torch is installed.
      pip download -q --no-deps --no-build-isolation -d "$CACHE/sdist" "pb1-detectron2==0.6"
      sdist="$CACHE/sdist/pb1-detectron2-0.6.tar.gz"
    fi
    "$BASE/bin/python" tools/install_d2_sdist.py "$sdist"
  fi
  touch "$BASE/.setup-complete"
fi
flock -u 9

# This clone's layer: a venv of the same interpreter that reads the cached stack, plus `pip install -e .`.
rm -rf .venv
"$BASE/bin/python" -m venv --without-pip .venv
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
base_site=$("$BASE/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# addsitedir also runs the stack's own .pth files (namespace packages, setuptools' distutils shim)
echo "import site; site.addsitedir('$base_site')" > "$site/crossmae_stack.pth"
env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null .venv/bin/python -m pip install -q --disable-pip-version-check \
  --no-deps --no-build-isolation --no-index -e .
.venv/bin/python tools/check_env.py
echo "$stamp" > "$LAYER_STAMP"
