#!/usr/bin/env bash
# Build the wheel folder that tools/gpu_check.sh installs on a GPU machine without a package registry.
#
# The lent GPU machines (Python 3.12, x86-64, torch 2.11 and most of the stack already there; see README "GPU: the
# readiness check") lack detectron2 and its pure-Python needs. This downloads exactly the versions that
# requirements.txt pins for those, as cp312 manylinux x86-64 wheels; the two pinned needs published only as sdists
# (fvcore; antlr4-python3-runtime 4.9.3, which omegaconf and hydra-core require) are built here into pure-Python
# wheels; detectron2 v0.6 travels as its sdist (pb1-detectron2, Python files only), which tools/install_d2_sdist.py
# copies into the check's temporary site.
#
#   bash tools/gpu_wheels.sh [DIR]     # default .whl (git-ignored); prints the folder's total size
#
#   PYTHON  the interpreter whose pip downloads (default python3; any version: the targets are named)
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
PYTHON=${PYTHON:-python3}
CACHE=${CROSSMAE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/crossmae-vitdet}

# Missing on the lent GPU machines (they hold torch, torchvision, timm, opencv, safetensors, ...): detectron2's
# needs and pycocotools / shapely. setuptools: v0.6 imports pkg_resources, which setuptools 81 removed, and the
# machines' version is not known.
BINARY="pycocotools shapely iopath omegaconf hydra-core termcolor yacs setuptools"
FROM_SDIST="fvcore"
ANTLR="antlr4-python3-runtime==4.9.3"  # not in requirements.txt: omegaconf 2.3 and hydra-core 1.3 pin 4.9.*

pin() {  # NAME -> NAME==VERSION as requirements.txt pins it
  local line
  line=$(grep -i "^$1==" requirements.txt) || { echo "gpu_wheels: $1 is not pinned in requirements.txt" >&2; exit 1; }
  echo "$line"
}

mkdir -p "$DIR"
rm -f "$DIR"/*.whl "$DIR"/*.tar.gz
pip() { env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null "$PYTHON" -m pip "$@"; }
specs=()
for name in $BINARY; do specs+=("$(pin "$name")"); done
pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$DIR" "${specs[@]}"
sdists=()
for name in $FROM_SDIST; do sdists+=("$(pin "$name")"); done
pip wheel -q --disable-pip-version-check --no-deps -w "$DIR" "${sdists[@]}" "$ANTLR"

sdist="$CACHE/sdist/pb1-detectron2-0.6.tar.gz"  # tools/setup_env.sh keeps it here
if [ -f "$sdist" ]; then
  cp "$sdist" "$DIR/"
else
  # its setup.py imports torch: the download needs an interpreter with torch (e.g. PYTHON=.venv/bin/python's base)
  pip download -q --disable-pip-version-check --no-deps --no-build-isolation -d "$DIR" "pb1-detectron2==0.6"
fi

ls -1 "$DIR"
echo "gpu_wheels: $(ls "$DIR" | wc -l) files, $(du -sh "$DIR" | cut -f1) in $DIR (carry it: at most 64 MiB travel with the tree)"
