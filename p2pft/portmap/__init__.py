"""
Router port mapping for the punching port: PCP (RFC 6887) and NAT-PMP (RFC
6886) with codecs and a UDP client of our own, UPnP-IGD through the
C{miniupnpc} module on a thread, behind one façade (L{PortMapper}).  A
symmetric NAT that maps a port on request gives the other side an address
it can reach directly: the mapped address is offered as an extra
candidate (L{SessionMapping}).

  - L{p2pft.portmap.natpmp}, L{p2pft.portmap.pcp}: the messages, pure;
  - L{p2pft.portmap.udp}: one request/answer exchange over UDP;
  - L{p2pft.portmap.clients}: one client per protocol;
  - L{p2pft.portmap.mapper}: the façade (race, renew, delete, exit);
  - L{p2pft.portmap.gateway}: the default gateway;
  - L{p2pft.portmap.session}: what a session asks of it.
"""

from .errors import PortMapError, ReplyError
from .mapper import IPortMapper, Mapping, PortMapper
from .session import SessionMapping

__all__ = ["IPortMapper", "Mapping", "PortMapError", "PortMapper", "ReplyError", "SessionMapping"]
