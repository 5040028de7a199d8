"""
C{--streams auto} as a plain object: fed, every second or so, what the
connections' TCP says (bytes the other side acknowledged, segments
retransmitted, segments sent, summed over the lanes), it says how many
streams the session should have.  The lane finder (L{p2pft.connect}) opens
them.

A step lasts STEP seconds and at least STEP_BYTES acknowledged (at most
STEP_MAX seconds); a step in which nothing moved (a person deciding, a
reconnection) starts again.  The first step only warms up: TCP's slow
start, before the path's first losses, moves more than the path then
sustains.  After the second, still on one stream: more streams only if that
stream is limited by loss -- it retransmitted at least MIN_LOSS of its
segments -- since a clean path is limited by its capacity, which one stream
fills and several only share (and reorder); then START, and after their own
warm-up step and one more, MAX if that raised the rate by GAIN.
"""

from __future__ import annotations

import attrs

#: Seconds a step lasts at least: some 30 round trips of a 100 ms path.
STEP = 3.0
#: ... and at least this many bytes acknowledged (TCP's count, where the
#: kernel gives it, moves by the byte; the session's own by a 1 MiB
#: record), unless that takes more than STEP_MAX seconds (a very slow path).
STEP_BYTES = 512 << 10
STEP_MAX = 12.0
#: Retransmitted segments of one stream from which a path counts as limited
#: by loss, not capacity: one Reno stream then gets about 1.22 MSS / (RTT
#: sqrt(p)) whatever the link (Mathis), and each further stream about as
#: much again.  A clean path's own queue overflows cost one stream far less
#: (0.01 % at 100 Mbit/s and 100 ms in the lab).
MIN_LOSS = 0.001
#: Streams on a loss-limited path (croc always uses 4) ...
START = 4
#: ... and at most (derphole uses 8), if going there raised the rate by GAIN.
MAX = 8
GAIN = 1.15


@attrs.define
class AutoStreams:
    """How many streams C{--streams auto} wants (L{target}); L{done} once
    it has decided for good."""

    target: int = 1
    done: bool = False
    #: Why it decided (for the log), once done.
    why: str = ""
    _warm: bool = False
    _rate: float = 0.0
    _since: float | None = None
    _start: tuple | None = None

    def tick(self, now: float, acked: int, retransmitted: int | None = None,
             sent: int | None = None) -> bool:
        """What TCP says now (totals since the start; C{retransmitted} and
        C{sent} None where the kernel does not say); whether L{target}
        changed."""
        counts = (acked, retransmitted, sent)
        if self.done:
            return False
        if self._since is None or acked == self._start[0]:
            # The first tick, or nothing moved: the step starts (again) now.
            self._since, self._start = now, counts
            return False
        elapsed, got = now - self._since, acked - self._start[0]
        if elapsed < STEP or (got < STEP_BYTES and elapsed < STEP_MAX):
            return False
        rate, start = got / elapsed, self._start
        self._since, self._start = now, counts
        if not self._warm:
            self._warm = True
            return False
        if self.target == 1:
            self._rate = rate
            if None not in (retransmitted, sent, start[1], start[2]) and sent > start[2]:
                lost = (retransmitted - start[1]) / (sent - start[2])
                if lost < MIN_LOSS:
                    return self._decide(f"one stream, {rate / 1e6:.2f} MB/s, {lost:.3%} of its segments "
                                        "retransmitted: a clean path")
            return self._grow(START)
        previous, self._rate = self._rate, rate
        if self.target >= MAX or rate < previous * GAIN:
            return self._decide(f"{self.target} streams, {rate / 1e6:.2f} MB/s")
        return self._grow(min(MAX, 2 * self.target))

    def _grow(self, target: int) -> bool:
        # New streams punch, then start slow: their first step warms up too.
        self.target, self._warm = target, False
        return True

    def _decide(self, why: str) -> bool:
        self.done, self.why = True, why
        return False
