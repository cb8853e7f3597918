"""Redis clients: the client factory, URL redaction, and the error policy of sources and sinks.

Sources and sinks share one error policy (`is_outage`, `Outage`): what waiting can fix (an
unreachable, hung, loading or full server, a failover) is retried with backoff for at most
`FRAUD_REDIS_RETRY_BUDGET_S` of wall-clock time per outage, logged once when it starts and once
when it ends or the budget is spent; what waiting cannot fix (a wrong password, a missing ACL
permission) is a `RedisConfigError` at once.
"""

from __future__ import annotations

import logging
import time
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

logger = logging.getLogger(__name__)


def redact(url: str) -> str:
    """`url` with any password (userinfo or `?password=` query) replaced by `***`, for logs.

    A userinfo without a colon (`redis://TOKEN@host`) is hidden whole: some clients and providers
    put the password there, and a log cannot tell a user name from a token.
    """
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, hostinfo = netloc.rpartition("@")
            user, colon, _ = userinfo.partition(":")
            netloc = f"{user}:***@{hostinfo}" if colon else f"***@{hostinfo}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            query = urlencode([(k, "***" if k.lower() == "password" else v) for k, v in pairs], safe="*/")
        # Rebuilt by hand: urlunsplit would turn "unix:///path" into "unix:/path".
        text = f"{parts.scheme}://{netloc}{parts.path}" if parts.scheme else netloc + parts.path
        text += f"?{query}" if query else ""
        return text + (f"#{parts.fragment}" if parts.fragment else "")
    except ValueError:
        return "<unparseable redis url>"


def connect(url: str, **kw: Any) -> redis.Redis:
    """A client for `url` (redis://, rediss:// or unix://) with bounded timeouts and retries.

    Timeouts keep a dead server from hanging the dataflow forever; the short client-level retry
    absorbs blips, while callers (the sink) own the longer outage policy. Keyword arguments
    override the defaults.
    """
    options: dict[str, Any] = {
        "socket_timeout": 10.0,
        "socket_connect_timeout": 5.0,
        "health_check_interval": 30,
        "retry_on_timeout": True,
        "retry": Retry(ExponentialBackoff(cap=1.0, base=0.05), 3),
    }
    options.update(kw)
    return redis.Redis.from_url(url, **options)


class RedisConfigError(RuntimeError):
    """Redis refused a command for a reason waiting cannot fix (password, ACL, wrong key type)."""


class RedisUnavailableError(RuntimeError):
    """Redis could not serve a source or sink for the whole retry budget of one outage."""


DEFAULT_RETRY_BUDGET_S = 30.0
INITIAL_BACKOFF_S = 0.1
MAX_BACKOFF_S = 5.0
MIN_IO_TIMEOUT_S = 0.5
MAX_IO_TIMEOUT_S = 5.0

# AuthenticationError and AuthorizationError are ConnectionError subclasses in redis-py, and
# NoPermissionError (NOPERM) a ResponseError one: they must be told apart from real outages.
_REFUSALS: tuple[type[redis.RedisError], ...] = (
    redis.AuthenticationError,
    redis.exceptions.AuthorizationError,
    redis.exceptions.AuthenticationWrongNumberOfArgsError,
    redis.exceptions.NoPermissionError,
)
# Replies that say "not now": OOM (maxmemory reached), a replica during failover (READONLY),
# a cluster resharding or failing over (TRYAGAIN, CLUSTERDOWN, MASTERDOWN).
_BUSY: tuple[type[redis.RedisError], ...] = (
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,
)


def is_refusal(exc: BaseException) -> bool:
    """True for a wrong or missing password, or a missing ACL permission (NOPERM)."""
    return isinstance(exc, _REFUSALS)


def is_outage(exc: BaseException) -> bool:
    """True for an error that waiting can fix: unreachable, hung (timeout), loading, full, failing
    over. Authentication and permission errors are not, though redis-py raises some as
    ConnectionError."""
    if is_refusal(exc):
        return False
    return isinstance(exc, (redis.ConnectionError, redis.TimeoutError, *_BUSY)) or _full_in_script(exc)


def _full_in_script(exc: BaseException) -> bool:
    """An OOM met by a write inside a script: Redis 6 wraps it in a plain script error."""
    return isinstance(exc, redis.ResponseError) and "OOM command not allowed" in str(exc)


def diagnosis(exc: BaseException) -> str:
    """A short diagnosis of an error retrying cannot fix (redis-py drops the NOPERM code)."""
    if isinstance(exc, redis.exceptions.NoPermissionError):
        return "NOPERM: the ACL user lacks a command or key permission; grant it (README: minimal ACL)"
    if is_refusal(exc):
        return "authentication failed: check the user and password in the URL"
    return type(exc).__name__


def io_timeout_s(budget_s: float) -> float:
    """Longest one command may go unanswered before it counts as an outage.

    A third of the retry budget, so that a hung server (accepts, never answers) is tried a few
    times before the budget is spent, within 0.5 s .. 5 s: a healthy server answers in
    milliseconds, and the budget is overrun by at most this much (the attempt in flight).
    """
    return min(MAX_IO_TIMEOUT_S, max(MIN_IO_TIMEOUT_S, budget_s / 3))


def partition_client(url: str, budget_s: float, *, wait_s: float = 0.0) -> redis.Redis:
    """A client for a source or sink partition, whose `Outage` owns the retry policy.

    One immediate client-level retry replaces a stale pooled connection (after a server
    restart); a timeout is not retried there, or a hung server would cost twice the timeout per
    attempt. `wait_s`: how long a command may legitimately wait (a blocking XREAD).
    """
    timeout = io_timeout_s(budget_s)
    return connect(
        url,
        retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
        retry_on_timeout=False,
        socket_timeout=wait_s + timeout,
        socket_connect_timeout=timeout,
    )


class Outage:
    """The clock of one outage at a time, for one source or sink partition.

    Attempts back off from 0.1 s doubling to 5 s, for at most `budget_s` of wall-clock time from
    the start of the first failed attempt (the last delay is shortened so that one attempt comes
    at the deadline). The log gets two lines per outage, never one per attempt: a warning when
    it starts, then an info line with its duration when it ends, or an error when the budget is
    spent.
    """

    def __init__(
        self,
        budget_s: float,
        log: logging.Logger,
        *,
        initial_backoff_s: float = INITIAL_BACKOFF_S,
        max_backoff_s: float = MAX_BACKOFF_S,
    ) -> None:
        if budget_s <= 0:
            raise ValueError(f"retry budget must be > 0 s, got {budget_s}")
        self.budget_s = budget_s
        self._log = log
        self._initial_s = initial_backoff_s
        self._max_s = max_backoff_s
        self._backoff = initial_backoff_s
        self.since: float | None = None
        self.attempts = 0

    def failed(self, what: str, exc: Exception, began: float, note: str = "") -> float | None:
        """Record a failed attempt that began at `began` (time.monotonic()); return the delay
        before the next one, or None once the budget is spent (then call `give_up`)."""
        if self.since is None:
            self.since = began
            self._log.warning(
                "%s failed (%s: %s); retrying with backoff for up to %gs (FRAUD_REDIS_RETRY_BUDGET_S)%s",
                what,
                type(exc).__name__,
                exc,
                self.budget_s,
                note,
            )
        self.attempts += 1
        remaining = self.since + self.budget_s - time.monotonic()
        if remaining <= 0:
            return None
        delay = min(self._backoff, remaining)
        self._backoff = min(self._backoff * 2, self._max_s)
        return delay

    def give_up(self, what: str, exc: Exception, note: str = "") -> str:
        """Log and return the error message of a spent budget."""
        since = self.since if self.since is not None else time.monotonic()
        message = (
            f"{what}: Redis unavailable for {time.monotonic() - since:.1f}s ({self.attempts} attempts), "
            f"the retry budget of {self.budget_s:g}s (FRAUD_REDIS_RETRY_BUDGET_S) is spent; "
            f"last error {type(exc).__name__}: {exc}{note}"
        )
        self._log.error("%s", message)
        return message

    def over(self, what: str) -> None:
        """An attempt succeeded: log the end of an ongoing outage, with its duration, and reset."""
        if self.since is None:
            return
        self._log.info(
            "%s: Redis answers again after %.1fs (%d failed attempt%s)",
            what,
            time.monotonic() - self.since,
            self.attempts,
            "" if self.attempts == 1 else "s",
        )
        self.since, self.attempts, self._backoff = None, 0, self._initial_s
