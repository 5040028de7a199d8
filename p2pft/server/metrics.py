"""
The server's events (L{IServerEvents}) as Prometheus metrics, and the web
page that serves them (C{--metrics HOST:PORT}): C{/metrics} in Prometheus
text format (OpenMetrics when the scraper asks for it), C{/healthz} for a
load balancer or systemd.

Counters and histograms move on events; the gauges of what is open now are
read from the servers' state when scraped, so they cannot drift.  Each
service has its own registry (not prometheus_client's global one), so two
services, or many tests, in one process do not collide.  Every metric is
listed in docs/OPERATING.md.

The page is rendered in the reactor thread with the library's own encoder
(prometheus_client's Twisted resource runs the WSGI app in a thread pool,
which would read the servers' state from another thread, and imports the
global reactor when imported).
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.exposition import CONTENT_TYPE_LATEST, choose_encoder, generate_latest
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer

from .events import ENDINGS, PATHS, IServerEvents, Refusal

#: Seconds from a nameplate's first member to its second: people reading a
#: code to each other take from seconds to minutes; the waiting timeout
#: (default an hour) bounds it.
PAIRING_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600)
#: Seconds from PAIRED to the chosen connection, as peers report it: a
#: direct path on a LAN takes tens of ms, punching across NATs up to a few
#: seconds, a relay at least its 2 s head start.
CONNECT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 30, 60)
#: Seconds a relayed session lasts: from a text message to a large folder
#: over a slow link.
RELAY_SESSION_BUCKETS = (1, 10, 60, 300, 1800, 3600, 4 * 3600)


@implementer(IServerEvents)
class Metrics:
    """Counts the events into C{registry} (a new one by default)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        # No *_created series: a timestamp per label set that no dashboard
        # of ours uses, doubling the page.  (A process-wide switch of the
        # library; a p2pft server is the only user in its process.)
        disable_created_metrics()
        self.registry = r = CollectorRegistry() if registry is None else registry
        self.connections = Counter(
            "p2pft_connections", "Client connections accepted (before any limit).", registry=r)
        self.refusals = Counter(
            "p2pft_refusals", "Connections refused (ERROR, then closed), by reason.", ["reason"], registry=r)
        for why in Refusal:
            self.refusals.labels(why.label)
        self.connections_open = Gauge(
            "p2pft_connections_open", "Client connections open now (rendezvous clients and relay legs).",
            registry=r)
        self.nameplates = Gauge("p2pft_nameplates_in_use", "Nameplates in use now.", registry=r)
        self.pairings = Counter("p2pft_pairings", "Nameplates that got their second member.", registry=r)
        self.pairing_seconds = Histogram(
            "p2pft_pairing_seconds", "Seconds from a nameplate's first member to its second.",
            buckets=PAIRING_BUCKETS, registry=r)
        self.expiries = Counter(
            "p2pft_nameplates_expired", "Nameplates that timed out, waiting or paired.", ["state"], registry=r)
        for state in ("waiting", "paired"):
            self.expiries.labels(state)
        self.relay_sessions = Counter("p2pft_relay_sessions", "Relay sessions spliced.", registry=r)
        self.relay_open = Gauge(
            "p2pft_relay_sessions_open", "Relay sessions now, waiting for their other side or spliced.",
            registry=r)
        self.relay_ended = Counter(
            "p2pft_relay_sessions_ended", "Relay sessions ended, by why.", ["why"], registry=r)
        for why in ENDINGS:
            self.relay_ended.labels(why)
        self.relay_bytes = Counter(
            "p2pft_relay_bytes", "Bytes relayed, both directions, counted when a session ends.", registry=r)
        self.relay_seconds = Histogram(
            "p2pft_relay_session_seconds", "Seconds relay sessions lasted.",
            buckets=RELAY_SESSION_BUCKETS, registry=r)
        self.peer_sessions = Counter(
            "p2pft_peer_sessions", "Sessions as their senders reported them (REPORT), by path.",
            ["path"], registry=r)
        self.connect_seconds = Histogram(
            "p2pft_peer_connect_seconds", "Seconds from PAIRED to the chosen connection, as senders reported.",
            ["path"], buckets=CONNECT_BUCKETS, registry=r)
        for path in PATHS:
            self.peer_sessions.labels(path)
            self.connect_seconds.labels(path)
        self._open: list[Callable[[], int]] = []

    # -- what is open now, read when scraped

    def watch(self, rendezvous=None, relay=None) -> None:
        """Read the open gauges from a L{RendezvousServer} and/or a
        L{RelayServer}."""
        if rendezvous is not None:
            self._open.append(lambda: rendezvous.connections)
            self.nameplates.set_function(lambda: rendezvous.nameplates_in_use)
        if relay is not None:
            self._open.append(lambda: relay.connections)
            self.relay_open.set_function(lambda: relay.sessions)
        self.connections_open.set_function(lambda: sum(f() for f in self._open))

    # -- IServerEvents

    def listening(self, service, address, settings):
        pass

    def connected(self, address):
        self.connections.inc()

    def refused(self, reason, address):
        self.refusals.labels(reason.label).inc()

    def paired(self, seconds):
        self.pairings.inc()
        self.pairing_seconds.observe(seconds)

    def expired(self, paired):
        self.expiries.labels("paired" if paired else "waiting").inc()

    def relaySessionStarted(self, session, addresses):
        self.relay_sessions.inc()

    def relaySessionEnded(self, session, bytes, seconds, why):
        self.relay_ended.labels(why).inc()
        self.relay_bytes.inc(bytes)
        self.relay_seconds.observe(seconds)

    def peerReport(self, path, seconds):
        self.peer_sessions.labels(path).inc()
        self.connect_seconds.labels(path).observe(seconds)


class MetricsPage(Resource):
    """C{GET /metrics}: the registry, in the format the scraper accepts."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry):
        super().__init__()
        self._registry = registry

    def render_GET(self, request) -> bytes:
        accept = request.getHeader(b"accept")
        try:
            encoder, content_type = choose_encoder(accept.decode("latin-1") if accept else None)
            body = encoder(self._registry)
            content_type.encode("ascii")
        except Exception:  # a header the library chokes on: the plain format, not a 500
            encoder, content_type = generate_latest, CONTENT_TYPE_LATEST
            body = encoder(self._registry)
        request.setHeader(b"content-type", content_type.encode("ascii"))
        return body


class HealthPage(Resource):
    """C{GET /healthz}: 200 while C{healthy()} says the service listens,
    503 otherwise; a short text body either way."""

    isLeaf = True

    def __init__(self, healthy: Callable[[], bool]):
        super().__init__()
        self._healthy = healthy

    def render_GET(self, request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        if self._healthy():
            return b"ok\n"
        request.setResponseCode(503)
        return b"not listening\n"


class MetricsSite(Site):
    """The metrics port: C{/metrics} and C{/healthz}, without an access log
    (a scrape every few seconds is not worth a line)."""

    noisy = False

    def __init__(self, registry: CollectorRegistry, healthy: Callable[[], bool]):
        root = Resource()
        root.putChild(b"metrics", MetricsPage(registry))
        root.putChild(b"healthz", HealthPage(healthy))
        super().__init__(root)

    def log(self, request) -> None:
        pass
