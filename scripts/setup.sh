#!/usr/bin/env bash
# Prepare this checkout: a virtualenv in .venv with p2pft installed, and (as
# root) the system tools the NAT lab needs.  Idempotent; sourced by
# scripts/demo.sh and scripts/test.sh, so nobody has to run it by hand.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    missing=()
    command -v iptables >/dev/null || missing+=(iptables)
    command -v ip >/dev/null || missing+=(iproute2)
    # path emulation: tc (tbf rates) and chrt (real-time delay lines)
    command -v tc >/dev/null || missing+=(iproute2)
    command -v chrt >/dev/null || missing+=(util-linux)
    # a real UPnP-IGD / NAT-PMP / PCP router in the lab (tests/natlab_upnp.py)
    command -v nft >/dev/null || missing+=(nftables)
    [ -x /usr/sbin/miniupnpd ] || missing+=(miniupnpd miniupnpd-nftables)
    if [ ${#missing[@]} -gt 0 ]; then
        mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
        echo "setup: installing ${missing[*]} for the NAT lab" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
fi

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv" >&2
    "${PYTHON:-python3}" -m venv .venv
fi
# A regular (not editable) install, so the twistd plugins land in
# site-packages/twisted/plugins where twistd looks for them.
echo "setup: installing p2pft into .venv" >&2
.venv/bin/pip install --quiet --disable-pip-version-check ".[test]" 2>&1 | grep -v '^WARNING: Location' >&2 || true
.venv/bin/python -c "import p2pft, spake2, cryptography, twisted" >/dev/null
