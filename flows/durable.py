"""Making the state files durable (`flows.shards`): what a shard appended is on disk before
Bytewax's store records a snapshot that names it.

An epoch close writes a few hundred shard files while it holds the whole input, so how they are
made durable is part of the latency. On Linux one syncfs(2) per filesystem does it (file data and
the names of new files, which a file's own fsync does not cover; write-back errors are reported
from 5.8 on), in a thread the shards kick as each snapshot is written, so the disk works while
the worker takes the other snapshots. Elsewhere each file is fsynced by a small pool of threads,
started the same way. `sync_files` (called when Bytewax pickles a `flows.shards.Manifest`) waits
for what is still running and raises a failure, so Bytewax never records that epoch.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from queue import SimpleQueue

from service.telemetry import snapshot_timer

_unsynced: dict[str, int] = {}  # shard files this process appended to since the last start -> device
_unsynced_lock = threading.Lock()
_syncer: _Syncer | None = None
SYNC_THREADS = 8
_SYNC_CLOCK = snapshot_timer("fsync")  # waiting for fsyncs: part of what an epoch close costs


def _load_syncfs() -> Callable[[int], int] | None:
    """Linux's syncfs(2): one call makes everything written to a filesystem durable (file data,
    and the names of new files, which a file's own fsync does not cover), and reports the
    write-back errors of that filesystem since the descriptor it is given was opened (5.8 on)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        call = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    call.argtypes, call.restype = [ctypes.c_int], ctypes.c_int
    return call


_SYNCFS = _load_syncfs()
_fs_fds: dict[int, int] = {}  # device -> a directory on it, opened before this process first wrote there


def watch(directory: Path, fd: int) -> int:
    """The device of a shard file just opened for appending (`fd`), keeping a descriptor on its
    filesystem from before the first write: syncfs reports the errors since that open."""
    dev = os.fstat(fd).st_dev
    if _SYNCFS is not None and dev not in _fs_fds:
        with _unsynced_lock:
            if dev not in _fs_fds:
                _fs_fds[dev] = os.open(directory, os.O_RDONLY)
    return dev


def _fsync(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:  # deleted since (left its shard's chain): nothing names it
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Background:
    """What the sync threads share: `wanted` counts what was asked of them, `done` what they
    finished (in the same units); `wait` returns once everything asked before it is done, and
    raises the first failure since the last wait."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.wanted = self.done = 0
        self.failure: BaseException | None = None

    def wait(self) -> bool:
        """Whether there was anything to wait for."""
        with self.cond:
            target = self.wanted
            waited = self.done < target
            while self.done < target:
                self.cond.wait()
            failure, self.failure = self.failure, None
        if failure is not None:
            raise failure
        return waited

    def _finished(self, failure: BaseException | None, upto: int | None = None) -> None:
        """One more thing done (or everything up to `upto`)."""
        with self.cond:
            self.done = self.done + 1 if upto is None else upto
            if failure is not None and self.failure is None:
                self.failure = failure
            self.cond.notify_all()


class _Syncer(_Background):
    """Threads that fsync the paths `start` queues (`wanted`: paths queued). A queue rather than
    a future per file: an epoch close starts a few hundred, and the worker's time per start is
    the cost."""

    def __init__(self, threads: int) -> None:
        super().__init__()
        self.queue: SimpleQueue[str] = SimpleQueue()
        for i in range(threads):
            threading.Thread(target=self._run, name=f"fraud-fsync-{i}", daemon=True).start()

    def start(self, paths: list[str]) -> None:
        with self.cond:
            self.wanted += len(paths)
        for path in paths:
            self.queue.put(path)

    def _run(self) -> None:
        while True:
            path = self.queue.get()
            failure: BaseException | None = None
            try:
                _fsync(path)
            except BaseException as exc:  # handed to the next wait, which raises it
                failure = exc
            self._finished(failure)


class _FsSyncer(_Background):
    """One thread that runs syncfs on every filesystem this process wrote state files to, again
    each time `kick` asks after new writes (`wanted`: kicks); a wait returns once a run that
    started after the last kick is done. The shards kick it as each snapshot is written, so the
    disk works while the worker takes the other snapshots."""

    def __init__(self, call: Callable[[int], int]) -> None:
        super().__init__()
        self.call = call
        threading.Thread(target=self._run, name="fraud-syncfs", daemon=True).start()

    def kick(self) -> None:
        with self.cond:
            self.wanted += 1
            self.cond.notify_all()

    def _run(self) -> None:
        while True:
            with self.cond:
                while self.done >= self.wanted:
                    self.cond.wait()
                target = self.wanted  # what this run covers: every write before these kicks
                fds = list(_fs_fds.values())
            failure = None
            for fd in fds:
                if self.call(fd) != 0:
                    err = ctypes.get_errno()
                    failure = OSError(
                        err, f"syncfs of the state files' filesystem failed: {os.strerror(err)}"
                    )
            self._finished(failure, upto=target)


_fs_syncer: _FsSyncer | None = None


def _forget_threads() -> None:
    """In a forked child the parent's sync threads do not exist: start new ones when needed."""
    global _syncer, _fs_syncer
    _syncer = _fs_syncer = None


os.register_at_fork(after_in_child=_forget_threads)


def appended(path: str, dev: int) -> None:
    """Note that `path` (on device `dev`, from `watch`) was appended to: the next `start_sync`
    or `sync_files` makes it durable."""
    with _unsynced_lock:
        _unsynced[path] = dev


def start_sync() -> None:
    """Start making every shard file appended to since the last start durable, in the
    background: a shard calls it once its snapshot is written, so the disk works while the
    worker goes on with the other shards' snapshots (an epoch close writes a few hundred files).
    On Linux one syncfs per filesystem (`_FsSyncer`) rather than a few hundred fsyncs, whose
    threads each make the worker wait for the GIL as they return; elsewhere each file's fsync."""
    global _syncer, _fs_syncer
    with _unsynced_lock:
        if not _unsynced:
            return
        paths = list(_unsynced)
        _unsynced.clear()
        if _SYNCFS is not None:
            if _fs_syncer is None:
                _fs_syncer = _FsSyncer(_SYNCFS)
            fs = _fs_syncer
        else:
            if _syncer is None:
                _syncer = _Syncer(SYNC_THREADS)
            syncer = _syncer
    if _SYNCFS is not None:
        fs.kick()
    else:
        syncer.start(paths)


def sync_files() -> None:
    """Wait until every shard file this process appended to is durable (starting what was not
    started yet): what a `Manifest` names is then on disk."""
    started = time.perf_counter()
    start_sync()
    waiter = _fs_syncer if _SYNCFS is not None else _syncer
    if waiter is not None and waiter.wait():
        _SYNC_CLOCK[0] += time.perf_counter() - started
