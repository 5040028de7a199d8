"""
p2pft: send files directly between two computers, even behind NATs.

Layers, lowest first (tests/test_layers.py holds the order and enforces it):
errors/util/addresses/codes -> rendezvous -> punch, candidates, secure ->
channel (one connection) -> session (the connections of one transfer) ->
transfer -> peer/connect (one peer's run), driven by cli and the twistd
plugins; the server package (rendezvous server, relay) runs on the public
host and uses only the lowest layers.
"""

__version__ = "0.3.0"
