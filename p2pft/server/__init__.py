"""
Everything that runs on the public host: the rendezvous server
(L{p2pft.server.rendezvous}), the relay (L{p2pft.server.relay}), the limits
both share (L{p2pft.server.limits}) and the twistd services that listen for
them (L{p2pft.server.service}).

Nothing here imports the peer's layers (punch, channel, transfer, session)
nor the command line: the servers take the wire helpers from
L{p2pft.rendezvous} and their options as plain values.
"""
