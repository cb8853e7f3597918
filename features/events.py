"""The event contract: transactions and labels, decoded and validated once at the edge.

A record that fails decoding becomes a `DeadLetter` carrying its raw payload and a reason code
from the bounded set `REASONS` (safe as a metrics label); nothing here raises on bad input.
"""

from __future__ import annotations

import math
import re
from datetime import datetime
from typing import Annotated, Literal

import msgspec

MIN_TS_MS = 946_684_800_000  # 2000-01-01: smaller epoch values are almost always seconds, not ms
MAX_TS_MS = 4_102_444_800_000  # 2100-01-01
MAX_AMOUNT = 1e9
"""Larger amounts are refused (`bad_amount`): no card payment comes near, and beyond it the
features' squares and the models' float32 inputs lose range (1e308 overflowed the cents column)."""
MAX_FIELD_CHARS = 256  # ids and optional strings: a longer value would become a state key
MAX_RECORD_BYTES = 65_536  # a larger payload is refused before decoding (`too_large`)
MAX_JSON_DEPTH = 64
"""Deeper nesting is refused (`bad_json`) before decoding: a record is one or two levels deep, and
the decoder recurses once per level, so a bound that depends on the caller's stack (about 990
levels) would make the same record pass in one place and fail in another."""

REASONS = (
    "bad_json",
    "schema",
    "bad_amount",
    "bad_time",
    "bad_location",
    "unknown_kind",
    "too_large",
    "duplicate_txn",
    "unknown_txn",
    "duplicate_label",
    "internal_error",
    "bad_control",
)

NonEmpty = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_FIELD_CHARS)]
Short = Annotated[str, msgspec.Meta(max_length=MAX_FIELD_CHARS)]
AwareTime = Annotated[datetime, msgspec.Meta(tz=True)]


class _WireTransaction(msgspec.Struct, forbid_unknown_fields=False):
    txn_id: NonEmpty
    ts: int | AwareTime
    card_id: NonEmpty
    merchant_id: NonEmpty
    amount: float
    currency: Short | None = None
    mcc: Short | None = None
    country: Short | None = None
    channel: Short | None = None
    device_id: Short | None = None
    ip: Short | None = None
    lat: float | None = None
    lon: float | None = None


class _WireLabel(msgspec.Struct):
    txn_id: NonEmpty
    is_fraud: bool
    ts: int | AwareTime


class Transaction(msgspec.Struct, frozen=True, gc=False):
    """A validated card transaction. `ts_ms` is event time in epoch milliseconds (UTC)."""

    txn_id: str
    ts_ms: int
    card_id: str
    merchant_id: str
    amount: float
    currency: str | None = None
    mcc: str | None = None
    country: str | None = None
    channel: str | None = None
    device_id: str | None = None
    ip: str | None = None
    lat: float | None = None
    lon: float | None = None
    received_ns: int = 0
    seq: int = 0
    raw: str = ""
    origin: str = ""  # where the record was read (stream entry, file line): its identity in dead letters


class Label(msgspec.Struct, frozen=True, gc=False):
    """A fraud verdict for `txn_id`, known from `ts_ms` on (chargebacks arrive days later)."""

    txn_id: str
    is_fraud: bool
    ts_ms: int
    received_ns: int = 0
    seq: int = 0
    raw: str = ""
    origin: str = ""


class DeadLetter(msgspec.Struct, frozen=True, gc=False):
    """A record that could not be used, with why. `raw` is the payload exactly as received;
    `origin` where it was read (`<stream>#<entry id>`, `<file>:<line>`), empty when unknown."""

    kind: str
    reason: str
    detail: str
    raw: str
    txn_id: str | None = None
    origin: str = ""


class _WireControl(msgspec.Struct, forbid_unknown_fields=True):
    command: Literal["champion", "shadow", "rules"]
    version: Short = ""
    digest: Short = ""
    text: str = ""
    sig: Short = ""


CONTROL_COMMANDS = ("champion", "shadow", "rules")


class Control(msgspec.Struct, frozen=True, gc=False):
    """An operator's command read from the input (`fraud model promote`, `fraud rules load`...): the
    scorer applies it at its place in the canonical order, so every process switches at the same
    event. `champion`/`shadow`: serve (or shadow) model `version` of the registry, whose model file
    has sha256 `digest` (`shadow` with no version turns the shadow off); `rules`: the rule set
    `text`. `sig`: its HMAC (`features.privacy.command_signature`), checked by the flow's decoder
    when `FRAUD_COMMAND_KEY` is set. It has no event time of its own (`ts_ms` 0): it takes its
    place after what its partition sent before it."""

    command: str
    version: str = ""
    digest: str = ""
    text: str = ""
    ts_ms: int = 0
    received_ns: int = 0
    seq: int = 0
    raw: str = ""
    origin: str = ""
    sig: str = ""

    @property
    def txn_id(self) -> str:
        """The key it takes through the steps keyed by transaction: its own, never a transaction's."""
        return f"~control:{self.origin}"


Kind = Literal["txn", "label", "control"]
Record = tuple[str, str, str]
"""What every source hands the flow: (kind, raw payload, origin). The origin says where the record
was read (`<stream>#<entry id>`, `<file>:<line>`) and identifies its dead letter."""
Decoded = Transaction | Label | Control | DeadLetter

_txn_decoder = msgspec.json.Decoder(_WireTransaction)
_label_decoder = msgspec.json.Decoder(_WireLabel)
_control_decoder = msgspec.json.Decoder(_WireControl)


class _Invalid(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def to_epoch_ms(ts: int | datetime) -> int:
    """Epoch milliseconds from an RFC 3339 time with offset or an epoch-milliseconds integer."""
    ms = ts if isinstance(ts, int) else round(ts.timestamp() * 1000)
    if not MIN_TS_MS <= ms < MAX_TS_MS:
        raise _Invalid("bad_time", f"ts {ts!r} is outside 2000..2100 (epoch values must be milliseconds)")
    return ms


def _schema_reason(e: msgspec.ValidationError) -> str:
    msg = str(e)
    if msg.endswith("`$.ts`"):
        return "bad_time"
    if msg.endswith("`$.amount`"):
        return "bad_amount"
    if msg.endswith(("`$.lat`", "`$.lon`")):
        return "bad_location"
    return "schema"


def _text(raw: bytes | str) -> str:
    """The payload as text; bytes that are not UTF-8 become lone surrogates (`surrogateescape`),
    so that `payload_bytes` gives back exactly what was received."""
    return raw if isinstance(raw, str) else raw.decode("utf-8", errors="surrogateescape")


def payload_bytes(raw: bytes | str) -> bytes:
    """The payload exactly as received: the inverse of `_text` (dead letters keep these bytes)."""
    if isinstance(raw, bytes):
        return raw
    try:
        return raw.encode("utf-8", errors="surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte: kept as its code point
        return raw.encode("utf-8", errors="surrogatepass")


_TOO_DEEP = "JSON nested too deeply to decode"


def _checked(raw: bytes | str) -> bytes:
    """The payload's bytes, refused when too large or nested too deep (before any parsing)."""
    data = payload_bytes(raw)
    if len(data) > MAX_RECORD_BYTES:
        raise _Invalid(
            "too_large", f"record of {len(data):,} bytes; at most {MAX_RECORD_BYTES:,} are accepted"
        )
    # Fast path: fewer openings than the bound cannot nest deeper (two C-speed counts).
    if data.count(b"[") + data.count(b"{") > MAX_JSON_DEPTH and json_depth(data) > MAX_JSON_DEPTH:
        raise _Invalid("bad_json", f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return data


_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"?', re.DOTALL)  # a JSON string, or an unterminated one
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def json_depth(data: bytes) -> int:
    """The deepest nesting of arrays and objects in `data`, brackets inside strings aside; works
    on text that is not valid JSON too (a cut-short or broken record)."""
    depth = deepest = 0
    for b in _STRING.sub(b"", data).translate(None, _NOT_BRACKETS):
        if b == 91 or b == 123:  # [ {
            depth += 1
            if depth > deepest:
                deepest = depth
        elif depth:
            depth -= 1
    return deepest


def _schema_or_json(e: msgspec.ValidationError, data: bytes) -> tuple[str, str]:
    """Reason and detail of a validation error. msgspec judges the first value's type before it
    reads on, so `1 garbage` or `"x" y` fail as "not an object": those are `bad_json` when the
    whole payload is not JSON, `schema` only when it is JSON of the wrong shape."""
    msg = str(e)
    if " - at `$" not in msg:  # the top-level value itself is not an object
        try:
            msgspec.json.decode(data)
        except msgspec.DecodeError as bad:
            return "bad_json", str(bad)
        except (RecursionError, UnicodeDecodeError):
            return "bad_json", "not JSON (nested too deeply, or not UTF-8)"
    return _schema_reason(e), msg


def _kept(raw: bytes | str, reason: str) -> str:
    """The payload a dead letter keeps: all of it, or the first MAX_RECORD_BYTES of one too large."""
    text = _text(raw)
    return text[:MAX_RECORD_BYTES] if reason == "too_large" else text


def decode_transaction(
    raw: bytes | str, received_ns: int = 0, seq: int = 0, origin: str = ""
) -> Transaction | DeadLetter:
    data = b""
    try:
        data = _checked(raw)
        w = _txn_decoder.decode(data)
        if not (math.isfinite(w.amount) and 0 <= w.amount <= MAX_AMOUNT):
            raise _Invalid(
                "bad_amount", f"amount must be a finite number in [0, {MAX_AMOUNT:g}], got {w.amount!r}"
            )
        if (w.lat is None) != (w.lon is None):
            raise _Invalid("bad_location", "lat and lon must be given together")
        if w.lat is not None and w.lon is not None and not (-90 <= w.lat <= 90 and -180 <= w.lon <= 180):
            raise _Invalid("bad_location", f"lat/lon out of range: {w.lat!r}, {w.lon!r}")
        return Transaction(
            w.txn_id, to_epoch_ms(w.ts), w.card_id, w.merchant_id, w.amount, w.currency, w.mcc,
            w.country, w.channel, w.device_id or None, w.ip or None, w.lat, w.lon, received_ns, seq, _text(raw),
            origin,
        )  # fmt: skip
    except msgspec.ValidationError as e:
        return DeadLetter("txn", *_schema_or_json(e, data), _text(raw), _txn_id_of(data), origin)
    except msgspec.DecodeError as e:
        return DeadLetter("txn", "bad_json", str(e), _text(raw), None, origin)
    except RecursionError:
        return DeadLetter("txn", "bad_json", _TOO_DEEP, _text(raw), None, origin)
    except UnicodeDecodeError as e:
        return DeadLetter("txn", "bad_json", f"not UTF-8: {e}", _text(raw), None, origin)
    except _Invalid as e:
        return DeadLetter("txn", e.reason, e.detail, _kept(raw, e.reason), _txn_id_of(raw), origin)


def decode_label(
    raw: bytes | str, received_ns: int = 0, seq: int = 0, origin: str = ""
) -> Label | DeadLetter:
    data = b""
    try:
        data = _checked(raw)
        w = _label_decoder.decode(data)
        return Label(w.txn_id, w.is_fraud, to_epoch_ms(w.ts), received_ns, seq, _text(raw), origin)
    except msgspec.ValidationError as e:
        return DeadLetter("label", *_schema_or_json(e, data), _text(raw), _txn_id_of(data), origin)
    except msgspec.DecodeError as e:
        return DeadLetter("label", "bad_json", str(e), _text(raw), None, origin)
    except RecursionError:
        return DeadLetter("label", "bad_json", _TOO_DEEP, _text(raw), None, origin)
    except UnicodeDecodeError as e:
        return DeadLetter("label", "bad_json", f"not UTF-8: {e}", _text(raw), None, origin)
    except _Invalid as e:
        return DeadLetter("label", e.reason, e.detail, _kept(raw, e.reason), _txn_id_of(raw), origin)


def decode_control(
    raw: bytes | str, received_ns: int = 0, seq: int = 0, origin: str = ""
) -> Control | DeadLetter:
    """An operator's command (see `Control`); a malformed one is a `bad_control` dead letter."""
    try:
        w = _control_decoder.decode(_checked(raw))
        if w.command in ("champion", "rules") and not (w.version and w.digest):
            raise _Invalid("bad_control", f"a {w.command!r} command needs a version and a digest")
        return Control(w.command, w.version, w.digest, w.text, 0, received_ns, seq, _text(raw), origin, w.sig)
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError, UnicodeDecodeError) as e:
        return DeadLetter("control", "bad_control", str(e), _text(raw), None, origin)
    except _Invalid as e:
        return DeadLetter("control", e.reason, e.detail, _kept(raw, e.reason), None, origin)


def decode(kind: str, raw: bytes | str, received_ns: int = 0, seq: int = 0, origin: str = "") -> Decoded:
    """Decode one record of `kind` ("txn" or "label"); never raises.

    `received_ns` (wall clock at arrival) measures latency; `raw` is kept so a record refused later
    (duplicate, unknown transaction) is dead-lettered exactly as received. `seq`, the event's place
    in the canonical order, is not known here: the flow decodes with 0 and its stamp step
    (`flows.ordering.StampLogic`) sets it; keyed steps then apply their batches in `seq` order,
    which Bytewax does not keep across keys.
    """
    if kind == "txn":
        return decode_transaction(raw, received_ns, seq, origin)
    if kind == "label":
        return decode_label(raw, received_ns, seq, origin)
    if kind == "control":
        return decode_control(raw, received_ns, seq, origin)
    return DeadLetter(
        str(kind)[:32], "unknown_kind", f"unknown record kind {kind!r}", _text(raw), None, origin
    )


class _HasTxnId(msgspec.Struct):
    txn_id: str | None = None


_id_decoder = msgspec.json.Decoder(_HasTxnId)


def _txn_id_of(raw: bytes | str) -> str | None:
    """Best-effort txn_id of a record that failed validation, so dead letters can be traced."""
    if len(raw) > MAX_RECORD_BYTES:
        return None
    try:
        return _id_decoder.decode(payload_bytes(raw)).txn_id
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
        return None


_encoder = msgspec.json.Encoder()


def encode(event: Transaction | Label) -> bytes:
    """Wire JSON of an event (ts as epoch ms), the inverse of `decode` up to arrival metadata."""
    d = msgspec.structs.asdict(event)
    for meta in ("received_ns", "seq", "raw", "origin"):
        d.pop(meta)
    d["ts"] = d.pop("ts_ms")
    return _encoder.encode({k: v for k, v in d.items() if v is not None})
