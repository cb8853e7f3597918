"""Card-id tokenization: applied by the flow's decoder (`flows.steps.decoder`), so that state,
snapshots and every output stream hold only tokens.

A token is `tok_` + the first 32 hex digits of HMAC-SHA256(key, card_id): deterministic, so
consumers can still group and join by card, and irreversible without the key (a plain hash of a
16-digit card number could be brute-forced). Pure Python, so that any layer may use it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Callable

TOKEN_PREFIX = "tok_"
TOKEN_HEX_CHARS = 32


def identity(card_id: str) -> str:
    """No tokenization: the card id as it is (no key configured)."""
    return card_id


def command_signature(key: bytes, command: str, version: str, digest: str) -> str:
    """HMAC-SHA256 (hex) of an operator command (`features.events.Control`): what `fraud model`
    and `fraud rules` attach when `FRAUD_COMMAND_KEY` is set, and what the decoder checks. The
    digest binds the model file or the rule text the command names."""
    message = "\0".join((command, version, digest)).encode("utf-8", errors="surrogatepass")
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def signed(key: bytes) -> Callable[[str, str, str, str], bool]:
    """Whether a command's `sig` is its signature under `key` (constant-time comparison)."""

    def check(command: str, version: str, digest: str, sig: str) -> bool:
        return hmac.compare_digest(command_signature(key, command, version, digest), sig)

    return check


def card_token(key: bytes | None) -> Callable[[str], str]:
    """The function mapping a card id to its keyed token; `identity` when `key` is None."""
    if key is None:
        return identity
    if not key:
        raise ValueError("the card token key must not be empty")

    def token(card_id: str) -> str:
        digest = hmac.new(key, card_id.encode(), hashlib.sha256).hexdigest()
        return TOKEN_PREFIX + digest[:TOKEN_HEX_CHARS]

    return token


# A "card_id" member of a JSON object, as text: a string (escapes included, possibly cut short by a
# truncated payload) or a bare number. Matched on the text, not a parse, so that it also finds the
# card id in a record that is not valid JSON (the dead letters of bad_json and too_large).
_CARD_MEMBER = re.compile(r'("card_id"\s*:\s*)(?:"((?:[^"\\]|\\.)*)("?)|(-?[0-9][0-9.eE+-]*))')


def tokenize_raw(raw: str, token: Callable[[str], str]) -> str:
    """`raw` with the value of every `"card_id"` member replaced by its token, the rest untouched.

    This is what a dead letter keeps when tokenization is on: the payload as received except for
    the card id. It cannot find a card number elsewhere: in another field, under an escaped key
    (`"card\\u005fid"`), or in text that is not JSON-like at all; those stay as they came.
    """
    if '"card_id"' not in raw:
        return raw

    def replace(m: re.Match[str]) -> str:
        literal, closed, number = m.group(2), m.group(3), m.group(4)
        if number is not None:
            return f'{m.group(1)}"{token(number)}"'
        try:
            value = json.loads(f'"{literal}"')
        except ValueError:  # a broken escape: the literal text is the best identity there is
            value = literal
        return f'{m.group(1)}"{token(value)}{closed and chr(34)}'

    return _CARD_MEMBER.sub(replace, raw)
