#!/usr/bin/env bash
# The GPU readiness check (workflows/gpu_check/): stack, pretraining with resume, benchmark, detection, demo.
# Runs from a copied working tree with no installed project: the tree goes on the Python path, and carried
# wheels (tools/gpu_wheels.sh, folder .whl) into a temporary site.
#
#   bash tools/gpu_check.sh --out /tmp/gpu_check                       # on a GPU machine, within --budget (480 s)
#   bash tools/gpu_check.sh --device cpu --tiny --out output/gpu_dry   # the dry run, on CPU
#
#   PYTHON  the interpreter (default .venv/bin/python where it exists, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -c 'import sys; from workflows.gpu_check import main; sys.exit(main())' "$@"
