"""Compact state held per transaction for weeks: `Table`, a str -> bytes mapping, and
`pack_vector`, a feature vector in a third fewer bytes.

The index and `pending` (`flows.steps`) keep an entry for every transaction waiting for its
label: millions per process. In a dict each entry costs a str key object, a slot and a value
object with its header; `features._table.Table` (C, built at install) keeps
each entry in one block (the key's UTF-8 bytes, then the value's bytes) and the table as an
array of pointers. The blocks come from 2 MiB chunks of the tables' own, in 16-byte size
classes (a freed block is the next one its class hands out), asking for transparent huge pages
(`madvise`; the kernel grants them where /sys/kernel/mm/transparent_hugepage/enabled is
"madvise" or "always"): the entries do not pay the C heap's header and rounding each, and
reaching one of millions at random costs no page-table walk. The chunks stay with the process
(their blocks are reused), as the C heap's pages would. A bytes value is stored inline; any
other value (rare: a label waiting for its row) by reference, and must not refer back to the table (the table is not garbage-collected).

A vector waiting for its label is kept as float32 values (what XGBoost scores), packed: most
features are counts, flags or missing, so a value takes one byte when it is an integer 0..250 or
NaN, three for an integer up to 65535, five otherwise (`python -m benchmarks.index_memory` prints
what the sample's vectors pack to). `unpack_vector` gives back the same float32 values.

Without a C compiler the install goes on: `Table` is a dict subclass with the same behaviour, and
the vectors are packed the same way in Python, slower. Tables pickle as their items.
"""

from __future__ import annotations

import copyreg
import math
import struct
from array import array
from collections.abc import Sequence
from typing import Any

__all__ = ["COMPILED", "Table", "pack_vector", "unpack_vector", "vector_bytes"]

_NAN, _U16, _F32, _SMALL = 253, 254, 255, 250  # the codes of features/_table.c


def _pack_py(values: Sequence[float]) -> bytes:
    out = bytearray()
    for f in array("f", values):  # float32, as stored
        if f != f:
            out.append(_NAN)
        elif f.is_integer() and 0 <= f <= 65535 and math.copysign(1.0, f) > 0:
            v = int(f)
            out += bytes((v,)) if v <= _SMALL else bytes((_U16, v & 0xFF, v >> 8))
        else:
            out += bytes((_F32,)) + struct.pack("=f", f)
    return bytes(out)


def _unpack_py(packed: bytes) -> bytes:
    out, i, n = array("f"), 0, len(packed)
    while i < n:
        c = packed[i]
        i += 1
        if c <= _SMALL:
            out.append(c)
        elif c == _NAN:
            out.append(math.nan)
        elif c == _U16 and i + 2 <= n:
            out.append(packed[i] | packed[i + 1] << 8)
            i += 2
        elif c == _F32 and i + 4 <= n:
            out.frombytes(packed[i : i + 4])
            i += 4
        else:
            raise ValueError(f"not a packed vector: byte {i - 1} of {n}")
    return out.tobytes()


class DictTable(dict[str, Any]):
    """The same table as a dict (without the compiled module)."""

    __slots__ = ()

    def copy(self) -> DictTable:
        return DictTable(self)

    @property
    def nbytes(self) -> int:
        return 0  # not measured: the dict's memory is Python's


try:
    from features._table import Table as _CTable
    from features._table import pack_floats as _pack
    from features._table import unpack_floats as _unpack
except ImportError:  # pragma: no cover - built at install; a dict does the same, with more memory
    _CTable, _pack, _unpack = None, _pack_py, _unpack_py

COMPILED = _CTable is not None
Table: Any = _CTable if _CTable is not None else DictTable


def pack_vector(values: Sequence[float]) -> bytes:
    """`values` as float32, packed (see the module's docstring)."""
    return _pack(values)


def unpack_vector(packed: bytes) -> array[float]:
    """The float32 values `pack_vector` packed (a NaN comes back as the canonical NaN)."""
    out = array("f")
    out.frombytes(_unpack(packed))
    return out


def vector_bytes(packed: bytes) -> bytes:
    """The float32 values `pack_vector` packed, as their bytes in native order: a row of the
    matrix XGBoost scores (`models.serving` joins a batch's rows and views them with numpy)."""
    return _unpack(packed)


def table_of(items: Any) -> Any:
    """A `Table` holding `items` (a mapping or (key, value) pairs)."""
    t = Table()
    for k, v in items.items() if hasattr(items, "items") else items:
        t[k] = v
    return t


def _reduce(t: Any) -> tuple[Any, ...]:
    return (table_of, (t.items(),))


if _CTable is not None:
    copyreg.pickle(_CTable, _reduce)
