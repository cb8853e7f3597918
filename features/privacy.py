"""Card-id tokenization for everything that leaves the flow (alerts, late side output, audit log).

A token is `tok_` + the first 32 hex digits of HMAC-SHA256(key, card_id): deterministic, so
consumers can still group and join by card, and irreversible without the key (a plain hash of a
16-digit card number could be brute-forced). Pure Python, so that any layer may use it.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable

TOKEN_PREFIX = "tok_"
TOKEN_HEX_CHARS = 32


def identity(card_id: str) -> str:
    """No tokenization: the card id as it is (no key configured)."""
    return card_id


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
