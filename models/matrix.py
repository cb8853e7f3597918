"""A float32 feature matrix kept on disk: training's rows without training's memory.

`fraud train` replays a file into one row per transaction; a year of them is as large as the
machine's memory allows, and only the model needs to fit there. `RowFile` appends rows to an
unlinked temporary file (the operating system removes it when it is closed or the process ends)
and reads back slices and row selections, one bounded block at a time: XGBoost builds its
quantised training matrix from such chunks (`models.xgb.train_xgb`), and the evaluation periods
are read as small in-memory copies. It answers `shape`, `len()`, `ndim` and `X[...]` (a slice, a
boolean mask or sorted or unsorted row indices) like the NumPy matrix it stands in for.
"""

from __future__ import annotations

import os
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import numpy as np

BLOCK_ROWS = 65_536  # rows buffered before a write and read at a time


class RowFile:
    """Rows of `width` float32 values, appended in order, then read back (`X[...]`)."""

    ndim = 2
    dtype = np.dtype(np.float32)

    def __init__(self, width: int, directory: Path | None = None) -> None:
        self.width = width
        self._file: IO[bytes] = tempfile.TemporaryFile(prefix="fraud-rows-", dir=directory)  # noqa: SIM115 (kept open: the matrix)
        self.close = weakref.finalize(self, self._file.close)  # closed when dropped, or by close()
        self._pending = np.empty((BLOCK_ROWS, width), dtype=np.float32)
        self._filled = 0
        self._rows = 0  # rows on disk

    def append(self, values: Sequence[float]) -> None:
        """Add one row (any sequence of `width` numbers)."""
        self._pending[self._filled] = values
        self._filled += 1
        if self._filled == BLOCK_ROWS:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows (reads flush first, so appending and reading may interleave)."""
        if self._filled:
            self._file.seek(0, os.SEEK_END)
            self._file.write(self._pending[: self._filled].tobytes())
            self._rows += self._filled
            self._filled = 0
            self._file.flush()

    @property
    def shape(self) -> tuple[int, int]:
        return self._rows + self._filled, self.width

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return len(self) * self.width * 4

    def _read(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as a new array."""
        out = np.empty((max(stop - start, 0), self.width), dtype=np.float32)
        if out.size:
            view = out.data.cast("B")
            got = os.preadv(self._file.fileno(), [view], start * self.width * 4)
            if got != len(view):
                raise OSError(f"the row file is short: read {got} of {len(view)} bytes at row {start}")
        return out

    def __getitem__(self, key: int | slice | np.ndarray | list[int]) -> np.ndarray:
        self.flush()
        if isinstance(key, int | np.integer):
            row = int(key) + (self._rows if key < 0 else 0)
            if not 0 <= row < self._rows:
                raise IndexError(f"row {key} of a matrix of {self._rows} rows")
            return self._read(row, row + 1)[0]
        if isinstance(key, slice):
            start, stop, step = key.indices(self._rows)
            if step != 1:
                return self.take(np.arange(start, stop, step))
            return self._read(start, stop)
        idx = np.asarray(key)
        if idx.dtype == bool:
            if idx.shape != (self._rows,):
                raise IndexError(f"a mask of {idx.shape} rows for a matrix of {self._rows}")
            idx = np.flatnonzero(idx)
        return self.take(idx)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The rows at `rows` (indices, any order, repeats allowed), reading only the blocks that
        hold them."""
        self.flush()
        idx = np.asarray(rows, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self._rows):
            raise IndexError(f"row index out of range for a matrix of {self._rows} rows")
        ordered = bool(np.all(idx[1:] >= idx[:-1]))
        order = np.arange(idx.size) if ordered else np.argsort(idx, kind="stable")
        wanted = idx if ordered else idx[order]
        out = np.empty((idx.size, self.width), dtype=np.float32)
        i = 0
        while i < wanted.size:
            start = int(wanted[i])
            stop = min(start + BLOCK_ROWS, self._rows)
            j = int(np.searchsorted(wanted, stop, side="left"))
            block = self._read(start, stop)
            out[order[i:j]] = block[wanted[i:j] - start]
            i = j
        return out


Matrix = np.ndarray | RowFile  # what training reads rows from
