"""
Benchmark only: run the p2pft CLI with direct candidates ignored, so the
transfer goes through the relay even on loopback (to measure the relay).
Lives outside the package on purpose.
"""

import sys

from p2pft import punch

_original = punch.PunchConnector.__init__


def _relay_only(self, reactor, local_port, candidates, *args, **kwargs):
    _original(self, reactor, local_port, [], *args, **kwargs)


punch.PunchConnector.__init__ = _relay_only

if __name__ == "__main__":
    from p2pft.cli import main

    sys.argv[0] = "p2pft"
    main()
