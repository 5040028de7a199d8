"""
Code phrases: ``<nameplate>-<word>-<word>``.

The nameplate is the only part that ever reaches the rendezvous server; the
words are the password that SPAKE2 turns into a session key.
"""

from __future__ import annotations

import re
import secrets
from importlib import resources

import attrs

from .errors import P2pftError

DEFAULT_WORDS = 2
MAX_NAMEPLATE_LENGTH = 12
MAX_CODE_LENGTH = 256

_NAMEPLATE = re.compile(r"[1-9][0-9]{0,%d}\Z" % (MAX_NAMEPLATE_LENGTH - 1))
_WORD = re.compile(r"[a-z0-9]{1,32}\Z")


def wordlist() -> tuple[str, ...]:
    """The shipped word list (256 words, one per line)."""
    text = resources.files("p2pft").joinpath("words.txt").read_text("ascii")
    return tuple(w for w in text.split() if w)


class CodeError(P2pftError, ValueError):
    """A code phrase that does not have the form N-word-word."""


@attrs.frozen
class Code:
    nameplate: str
    password: str

    def __str__(self) -> str:
        return f"{self.nameplate}-{self.password}"


def valid_nameplate(text: str) -> bool:
    return bool(_NAMEPLATE.match(text))


def parse_code(text: str) -> Code:
    """
    Split a typed code into nameplate and password, normalising case and
    surrounding white space.  Raise L{CodeError} with a one-line reason.
    """
    text = text.strip().lower()
    if len(text) > MAX_CODE_LENGTH:
        raise CodeError("code is too long")
    nameplate, _, password = text.partition("-")
    if not valid_nameplate(nameplate):
        raise CodeError(
            "code must start with a number, like 7-apple-river"
        )
    words = password.split("-")
    if not password or not all(_WORD.match(w) for w in words):
        raise CodeError(
            "code must be a number followed by words, like 7-apple-river"
        )
    return Code(nameplate, password)


def make_password(length: int = DEFAULT_WORDS, words=None) -> str:
    """Choose C{length} words uniformly with L{secrets}."""
    if length < 1:
        raise CodeError("a code needs at least one word")
    words = words or wordlist()
    return "-".join(secrets.choice(words) for _ in range(length))
