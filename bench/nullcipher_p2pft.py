"""
Benchmark only: run the p2pft CLI with the record cipher replaced by a
pass-through, to measure what encryption costs in a real transfer.  This
lives outside the package on purpose: p2pft itself has no plaintext mode.
Both peers must use it (the record framing stays the same, the bytes don't).
"""

import struct
import sys

from p2pft import secure

_HEADER = struct.Struct(">IB")


class NullSealer:
    def __init__(self, key):
        pass

    def seal(self, kind, plaintext):
        return [_HEADER.pack(len(plaintext) + secure.TAG, kind), plaintext, b"\0" * secure.TAG]


class NullOpener(secure.RecordOpener):
    def __init__(self, key):
        super().__init__(key)
        self._aead = self

    def decrypt(self, nonce, ct, aad):
        return bytes(ct[: len(ct) - secure.TAG])


secure.RecordSealer = NullSealer
secure.RecordOpener = NullOpener

if __name__ == "__main__":
    from p2pft.cli import main

    sys.argv[0] = "p2pft"
    main()
