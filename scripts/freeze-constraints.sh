#!/usr/bin/env bash
# Write constraints.txt: the exact versions of the main test venv (what CI ran), which `make demo` and
# `make test` install with. Run after changing a version range in setup.py, then run `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
{
  echo "# The exact versions CI ran the suite with (scripts/freeze-constraints.sh). make demo / make test install"
  echo "# with them (pip -c) so the demo's numbers reproduce; setup.py keeps the ranges for mixing."
  "$VENV/bin/pip" freeze --exclude-editable | grep -v '^#'
} > constraints.txt
echo "wrote constraints.txt ($(grep -vc '^#' constraints.txt) packages)"
