# Sourced by run_detector.sh and pretrain_variant.sh (experiment records): their usage when given too few
# arguments, the repository root and its python.
usage_unless() {  # MIN_ARGS SCRIPT NUM_ARGS: print SCRIPT's header comment and exit 2 if NUM_ARGS < MIN_ARGS
  if [ "$3" -lt "$1" ]; then
    sed -n '2,/^set /p' "$2" | sed '$d' | cut -c3-
    exit 2
  fi
}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
py=$root/.venv/bin/python
