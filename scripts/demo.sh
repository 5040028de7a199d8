#!/usr/bin/env bash
# The main job, on this machine: a rendezvous server, a receiver and a sender.
# As root it builds a NAT lab (network namespaces, two MASQUERADE routers) and
# punches through it; otherwise it runs on loopback.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
