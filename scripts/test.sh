#!/usr/bin/env bash
# Run the whole test suite (trial).  NAT-lab tests need root; elsewhere they
# skip with a reason, unless P2PFT_NATLAB_REQUIRED=1 turns that into failure.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
exec .venv/bin/python -m twisted.trial --jobs=2 "${@:-tests}"
