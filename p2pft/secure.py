"""
The secure channel: key agreement, candidate proofs and AEAD records.

1. L{Pake}: SPAKE2 over the rendezvous server's opaque messages, turning the
   short code into a 32-byte session key.
2. L{SessionKeys}: HKDF-SHA256 derives one key per purpose and direction.
3. L{Box}: AES-256-GCM with counter nonces for the few messages that travel
   through the rendezvous server (key confirmation, candidates).
4. L{Handshake}: on every candidate TCP connection both sides prove the key,
   bound to fresh nonces of that connection, before it may be chosen; the
   leader then commits to exactly one connection with a SELECT proof.
5. L{RecordSealer} / L{RecordOpener}: length-prefixed AES-256-GCM records on
   each connection of the session, one key per direction and connection,
   counter nonces; each record's header carries its session sequence number.

Everything here is plain Python: no sockets, no reactor.
"""

from __future__ import annotations

import hmac
import os
import struct
from hashlib import sha256

import attrs
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from spake2 import SPAKE2_A, SPAKE2_B

from .errors import P2pftError

SENDER = "sender"
RECEIVER = "receiver"
_ROLE_BYTE = {SENDER: b"S", RECEIVER: b"R"}

#: Largest plaintext in one record.  Receivers refuse bigger frames before
#: allocating anything for them.
MAX_RECORD = 1 << 20
TAG = 16
#: A record's header, its associated data: ciphertext length, record type,
#: and (protocol v2) the session's sequence number of the record (0: a
#: record of the connection itself, not of the session's sequence).
_HEADER = struct.Struct(">IBQ")


class SecurityError(P2pftError):
    """Authentication failed: the data is not from our peer, or was altered."""


class WrongCode(SecurityError):
    """The peer used a different code phrase (or someone guessed wrong)."""


def other(role: str) -> str:
    return RECEIVER if role == SENDER else SENDER


def _nonce(counter: int) -> bytes:
    return b"\0\0\0\0" + counter.to_bytes(8, "big")


# --------------------------------------------------------------------------
# Key agreement


class Pake:
    """
    One side of SPAKE2.  The outbound message is prefixed with a role byte,
    so two senders (or two receivers) on one code get a clear error instead
    of a misleading "wrong code".
    """

    def __init__(self, password: str, nameplate: str, role: str):
        self.role = role
        cls = SPAKE2_A if role == SENDER else SPAKE2_B
        ident = b"p2pft/v1/" + nameplate.encode("ascii")
        self._spake = cls(
            password.encode("utf-8"), idA=ident + b"/sender", idB=ident + b"/receiver"
        )

    def start(self) -> bytes:
        return _ROLE_BYTE[self.role] + self._spake.start()

    def finish(self, message: bytes) -> "SessionKeys":
        if message[:1] == _ROLE_BYTE[self.role]:
            raise SecurityError(f"the other side is also a {self.role}")
        if message[:1] != _ROLE_BYTE[other(self.role)]:
            raise SecurityError("the other side sent a malformed key exchange")
        try:
            key = self._spake.finish(message[1:])
        except Exception as e:  # spake2 raises its own types (NotOnCurve, ...)
            raise SecurityError("the other side sent a malformed key exchange") from e
        return SessionKeys(key, self.role)


def hkdf(key: bytes, purpose: str, length: int = 32) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=length, salt=None,
        info=b"p2pft/v1 " + purpose.encode("ascii"),
    ).derive(key)


@attrs.frozen(repr=False)
class SessionKeys:
    """All keys of one session, derived from the SPAKE2 key by purpose."""

    key: bytes
    role: str

    def _directional(self, purpose: str, sending: bool) -> bytes:
        writer = self.role if sending else other(self.role)
        return hkdf(self.key, f"{purpose} from {writer}")

    def box(self) -> "Box":
        """For messages relayed by the rendezvous server."""
        return Box(self._directional("rendezvous", True), self._directional("rendezvous", False))

    def reconnect_nameplate(self) -> str:
        """Where both peers meet again on the rendezvous server when every
        connection of the session is lost: a 12-digit nameplate only they
        can derive (the server sees an ordinary CLAIM)."""
        n = int.from_bytes(hkdf(self.key, "reconnect nameplate", 8), "big")
        return str(10**11 + n % (9 * 10**11))

    def reconnect_box(self, sender_nonce: bytes, receiver_nonce: bytes) -> "Box":
        """The L{Box} of one reconnection meeting, keyed by both sides'
        fresh nonces (sent in the clear first): its counter nonces start
        again at 0 under keys never used before."""
        salt = (sender_nonce + receiver_nonce).hex()
        return Box(self._directional(f"reconnect {salt}", True), self._directional(f"reconnect {salt}", False))

    def handshake_key(self) -> bytes:
        return hkdf(self.key, "candidate handshake")

    def relay_token(self) -> str:
        """What both peers present to a relay: only they can derive it."""
        return hkdf(self.key, "relay token").hex()

    def _record_key(self, sending: bool, binding: bytes) -> bytes:
        writer = self.role if sending else other(self.role)
        return HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None,
            info=f"p2pft/v2 records from {writer} ".encode("ascii") + binding,
        ).derive(self.key)

    def sealer(self, binding: bytes) -> "RecordSealer":
        """Records we write on the connection identified by C{binding}
        (L{Handshake.binding}: both nonces), so records can never be moved
        to, or replayed on, another connection of the session."""
        return RecordSealer(self._record_key(True, binding))

    def opener(self, binding: bytes) -> "RecordOpener":
        return RecordOpener(self._record_key(False, binding))

    def __repr__(self) -> str:  # never print keys
        return f"<SessionKeys {self.role}>"


class Box:
    """
    Sealed messages in one conversation: per-direction keys, counter nonces.
    A dropped, replayed, reordered or altered message fails to open.
    """

    def __init__(self, send_key: bytes, receive_key: bytes):
        self._send = AESGCM(send_key)
        self._receive = AESGCM(receive_key)
        self._sent = 0
        self._received = 0

    def seal(self, plaintext: bytes) -> bytes:
        ct = self._send.encrypt(_nonce(self._sent), plaintext, None)
        self._sent += 1
        return ct

    def open(self, ciphertext: bytes) -> bytes:
        try:
            pt = self._receive.decrypt(_nonce(self._received), ciphertext, None)
        except InvalidTag:
            raise SecurityError("a message from the other side failed authentication") from None
        self._received += 1
        return pt


# --------------------------------------------------------------------------
# Candidate handshake

#: HELLO's magic: "p2pft", 0, the protocol version (2), 0.
MAGIC = b"p2pft\x00\x02\x00"
NONCE = 16
MAC = 32
HELLO_SIZE = len(MAGIC) + NONCE


class Handshake:
    """
    The handshake on one candidate connection, as a machine fed with bytes.

    Both sides send HELLO (magic + fresh nonce) at once, then, having read
    the other's HELLO, PROOF = HMAC(k, "proof" | role | my nonce | their
    nonce).  A connection is I{authenticated} when the other side's PROOF
    checks.  Then the leader (the sender) may call L{select} on exactly one
    connection, which sends SELECT = HMAC(k, "select" | leader nonce |
    follower nonce); the follower reports I{selected} when it reads that.
    Anything after SELECT is record data, handed back as C{rest}.

    C{receive} returns a list of events: C{("send", bytes)},
    C{("authenticated",)}, C{("selected", rest)}.  It raises
    L{SecurityError} on anything unexpected: the caller drops the connection
    silently.
    """

    def __init__(self, handshake_key: bytes, role: str, nonce: bytes | None = None):
        self._key = handshake_key
        self.role = role
        self.nonce = nonce if nonce is not None else os.urandom(NONCE)
        self._buffer = b""
        self._peer_nonce: bytes | None = None
        self.state = "hello"  # -> proof -> authenticated -> selected

    @property
    def leader(self) -> bool:
        return self.role == SENDER

    def hello(self) -> bytes:
        return MAGIC + self.nonce

    def _mac(self, *parts: bytes) -> bytes:
        return hmac.new(self._key, b"|".join(parts), sha256).digest()

    def _proof(self, role: str, first: bytes, second: bytes) -> bytes:
        return self._mac(b"proof", role.encode("ascii"), first, second)

    def _select_mac(self) -> bytes:
        assert self._peer_nonce is not None
        if self.leader:
            return self._mac(b"select", self.nonce, self._peer_nonce)
        return self._mac(b"select", self._peer_nonce, self.nonce)

    def receive(self, data: bytes) -> list[tuple]:
        events: list[tuple] = []
        self._buffer += data
        while True:
            if self.state == "hello":
                if len(self._buffer) < HELLO_SIZE:
                    if not MAGIC.startswith(self._buffer[: len(MAGIC)]):
                        raise SecurityError("not a p2pft peer")
                    return events
                hello, self._buffer = self._buffer[:HELLO_SIZE], self._buffer[HELLO_SIZE:]
                if hello[: len(MAGIC)] != MAGIC:
                    raise SecurityError("not a p2pft peer")
                self._peer_nonce = hello[len(MAGIC):]
                if self._peer_nonce == self.nonce:
                    raise SecurityError("connected to ourselves")
                events.append(("send", self._proof(self.role, self.nonce, self._peer_nonce)))
                self.state = "proof"
            elif self.state == "proof":
                if len(self._buffer) < MAC:
                    return events
                proof, self._buffer = self._buffer[:MAC], self._buffer[MAC:]
                expected = self._proof(other(self.role), self._peer_nonce, self.nonce)
                if not hmac.compare_digest(proof, expected):
                    raise SecurityError("candidate failed to prove the session key")
                self.state = "authenticated"
                events.append(("authenticated",))
            elif self.state == "authenticated":
                if self.leader:
                    if self._buffer:
                        raise SecurityError("follower spoke before SELECT")
                    return events
                if len(self._buffer) < MAC:
                    return events
                mac, self._buffer = self._buffer[:MAC], self._buffer[MAC:]
                if not hmac.compare_digest(mac, self._select_mac()):
                    raise SecurityError("bad SELECT")
                self.state = "selected"
                rest, self._buffer = self._buffer, b""
                events.append(("selected", rest))
                return events
            else:
                raise SecurityError(f"unexpected data in state {self.state}")

    @property
    def binding(self) -> bytes:
        """The leader's nonce then the follower's: names this connection."""
        assert self._peer_nonce is not None
        if self.leader:
            return self.nonce + self._peer_nonce
        return self._peer_nonce + self.nonce

    def select(self) -> bytes:
        """Leader only: commit to this connection; returns the bytes to send."""
        if not self.leader or self.state != "authenticated":
            raise SecurityError("cannot select this connection")
        self.state = "selected"
        return self._select_mac()


# --------------------------------------------------------------------------
# Records


class RecordSealer:
    """
    Turns (type, plaintext, seq) into frames: a 13-byte header (big-endian
    ciphertext length, type byte, 8-byte sequence number) and AES-256-GCM
    ciphertext whose nonce is the record counter and whose associated data
    is the header.
    """

    def __init__(self, key: bytes):
        self._aead = AESGCM(key)
        self._counter = 0

    def seal(self, kind: int, plaintext: bytes, seq: int = 0) -> list[bytes]:
        if len(plaintext) > MAX_RECORD:
            raise ValueError("record too large")
        header = _HEADER.pack(len(plaintext) + TAG, kind, seq)
        ct = self._aead.encrypt(_nonce(self._counter), plaintext, header)
        self._counter += 1
        return [header, ct]

    def seal_into(self, kind: int, plaintext, seq: int, frame: memoryview) -> None:
        """Seal into C{frame}, exactly L{frame_size}C{(len(plaintext))}
        bytes (a reused buffer: nothing is allocated).  The same frame as
        L{seal}, in one piece."""
        n = len(plaintext)
        if n > MAX_RECORD:
            raise ValueError("record too large")
        if len(frame) != _HEADER.size + n + TAG:
            raise ValueError("frame of the wrong size")
        _HEADER.pack_into(frame, 0, n + TAG, kind, seq)
        with frame[:_HEADER.size] as header, frame[_HEADER.size:] as body:
            self._aead.encrypt_into(_nonce(self._counter), plaintext, header, body)
        self._counter += 1


def frame_size(plaintext_length: int) -> int:
    """Bytes on the wire of a record of C{plaintext_length} bytes."""
    return _HEADER.size + plaintext_length + TAG


#: Bytes of a record's header.
HEADER_SIZE = _HEADER.size


class RecordOpener:
    """Reassembles frames from a byte stream and opens them, in order."""

    def __init__(self, key: bytes):
        self._aead = AESGCM(key)
        self._counter = 0
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        """Return every complete record as (type, seq, plaintext); raise on forgery.

        Records that lie whole in C{data} are opened where they are; only a
        record split across reads is gathered in a buffer, so most bytes are
        never copied before decryption."""
        records: list[tuple[int, int, bytes]] = []
        with memoryview(data) as view:
            start = 0
            buf = self._buffer
            if buf:
                # Complete the record begun in an earlier read: its header
                # first, then exactly its body.
                start = min(len(view), max(0, _HEADER.size - len(buf)))
                buf += view[:start]
                if len(buf) < _HEADER.size:
                    return records
                more = min(len(view) - start, _HEADER.size + self._length(buf, 0) - len(buf))
                buf += view[start:start + more]
                start += more
                if len(buf) < _HEADER.size + self._length(buf, 0):
                    return records
                records.append(self._open(buf, 0))
                buf.clear()
            end = len(view)
            while end - start >= _HEADER.size:
                stop = start + _HEADER.size + self._length(view, start)
                if stop > end:
                    break
                records.append(self._open(view, start))
                start = stop
            buf += view[start:]
        return records

    def frame_length(self, frames, offset: int) -> int:
        """The whole frame's length (header included) of the record whose
        header is at C{offset} of C{frames}; L{SecurityError} when out of
        range (before anything is allocated for it)."""
        return _HEADER.size + self._length(frames, offset)

    def open_frame(self, frames, offset: int) -> tuple[int, int, bytes]:
        """Open the whole frame at C{offset} of C{frames} (read by the
        caller straight into its own buffer: see L{p2pft.channel.wire}).
        Only for a stream that never used L{feed}, or whose L{feed} left
        nothing L{pending}."""
        return self._open(frames, offset)

    def open_frame_into(self, frames, offset: int, out: memoryview) -> tuple[int, int, memoryview]:
        """L{open_frame}, the plaintext written into C{out} (exactly its
        length, L{frame_length} less the header and tag) instead of a new
        object: the receiver's file buffer (L{p2pft.channel.wire}).  What a
        record that fails to open left in C{out} is garbage, never data."""
        return self._open(frames, offset, out)

    @staticmethod
    def _length(frames, offset: int) -> int:
        """The ciphertext length in the header at C{offset}, checked."""
        length = _HEADER.unpack_from(frames, offset)[0]
        if length < TAG or length > MAX_RECORD + TAG:
            raise SecurityError("record length out of range")
        return length

    def _open(self, frames, offset: int, out: memoryview | None = None) -> tuple[int, int, bytes]:
        """Open the whole record at C{offset} of C{frames} (into C{out}, if given)."""
        length, kind, seq = _HEADER.unpack_from(frames, offset)
        body = offset + _HEADER.size
        with memoryview(frames) as view:
            header, ct = view[offset:body], view[body:body + length]
            try:
                if out is None:
                    pt = self._aead.decrypt(_nonce(self._counter), ct, header)
                else:
                    self._aead.decrypt_into(_nonce(self._counter), ct, header, out)
                    pt = out
            except InvalidTag:
                raise SecurityError("a record failed authentication (tampered, replayed or reordered)") from None
            finally:
                header.release()
                ct.release()
        self._counter += 1
        return kind, seq, pt

    @property
    def pending(self) -> int:
        """Bytes of an incomplete record still buffered."""
        return len(self._buffer)
