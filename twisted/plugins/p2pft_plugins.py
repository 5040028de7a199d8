# twistd plugins for p2pft.  ServiceMaker imports the named modules lazily,
# so plugin discovery never imports p2pft itself.
from twisted.application.service import ServiceMaker

p2pftServer = ServiceMaker(
    "p2pft rendezvous server",
    "p2pft.server_tap",
    "Rendezvous server that introduces p2pft peers (twistd -n p2pft-server --port 9000).",
    "p2pft-server",
)

p2pftPeer = ServiceMaker(
    "p2pft peer",
    "p2pft.client_tap",
    "Send or receive a file with p2pft (twistd -n p2pft send SERVER:PORT PATH).",
    "p2pft",
)

p2pftRelay = ServiceMaker(
    "p2pft relay",
    "p2pft.relay_tap",
    "Relay for p2pft peers that cannot connect directly (twistd -n p2pft-relay --port 9001).",
    "p2pft-relay",
)
