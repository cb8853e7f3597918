"""`features.table`: the compact str -> bytes table the index and `pending` keep their
per-transaction entries in (it behaves as a dict does, compiled or not), and the packed vectors
`pending` keeps (the same float32 values back)."""

from __future__ import annotations

import math
import pickle
import random
import sys
from array import array
from typing import Any

import pytest

from features import table
from features.table import COMPILED, Table, pack_vector, table_of, unpack_vector

KINDS = [pytest.param(table.DictTable, id="dict")]
if COMPILED:
    KINDS.insert(0, pytest.param(Table, id="compiled"))


def test_the_install_built_the_compiled_table() -> None:
    """`make setup` compiles features/_table.c: without it the flow's state costs twice the memory."""
    assert COMPILED and Table.__module__ == "features._table"


@pytest.mark.parametrize("kind", KINDS)
def test_random_operations_match_a_dict(kind: Any) -> None:
    """Sets, replacements, deletions (the table grows and shrinks through many sizes: deleting
    shifts entries back, no tombstones), lookups and listings agree with a dict at every step."""
    rnd = random.Random(7)
    t, d = kind(), {}
    for step in range(60_000):
        space = 3000 if step < 40_000 else 40  # then mostly deletions: the table shrinks again
        k = f"t{rnd.randrange(space)}" if rnd.random() < 0.95 else f"é{rnd.randrange(20)}✓"
        r = rnd.random()
        if r < 0.45:
            big = rnd.random() < 0.05  # values either side of the largest size class (1024 bytes)
            size = rnd.randrange(990, 1100) if big else rnd.randrange(300)
            v: Any = bytes(size) if rnd.random() < 0.9 else ("object", step)
            t[k] = d[k] = v
        elif r < 0.75:
            assert t.pop(k, None) == d.pop(k, None)
        elif r < 0.8 and k in d:
            del t[k], d[k]
        else:
            assert t.get(k) == d.get(k) and (k in t) == (k in d)
        assert len(t) == len(d)
    assert t == d and dict(t.items()) == d and sorted(t) == sorted(d) == sorted(t.keys())
    assert sorted(map(repr, t.values())) == sorted(map(repr, d.values()))
    for k in list(d):
        assert t[k] == d.pop(k)
        del t[k]
    assert len(t) == 0 and t == {} and list(t.items()) == []


@pytest.mark.parametrize("kind", KINDS)
def test_copies_and_pickles_are_independent_and_whole(kind: Any) -> None:
    t = kind()
    for k, v in {"a": b"1", "b": b"", "c": ("label", 1)}.items():
        t[k] = v
    c, back = t.copy(), pickle.loads(pickle.dumps(t))
    t["a"] = b"2"
    del t["b"]
    assert c == back == {"a": b"1", "b": b"", "c": ("label", 1)} and type(c) is type(back) is type(t)
    assert t == {"a": b"2", "c": ("label", 1)} and t != c
    assert table_of(t.items()) == table_of(dict(t.items())) == t and type(table_of({})) is Table


@pytest.mark.parametrize("kind", KINDS)
def test_dict_errors(kind: Any) -> None:
    t = kind()
    with pytest.raises(KeyError, match="'nope'"):
        t["nope"]
    with pytest.raises(KeyError):
        del t["nope"]
    assert t.pop("nope", 5) == 5 and t.get("nope") is None and t.get("nope", 1) == 1


@pytest.mark.skipif(not COMPILED, reason="the compiled table's own limits")
def test_compiled_table_limits_and_references() -> None:
    t = Table()
    with pytest.raises(TypeError, match="Table keys are str, not int"):
        t[1] = b""
    with pytest.raises(TypeError, match="str"):
        b"k" in t  # noqa: B015
    t["k" * 65_535] = b"1"
    assert t["k" * 65_535] == b"1"
    with pytest.raises(ValueError, match="key too long"):
        t["k" * 65_536] = b""
    big = bytes(40_000)  # over 32 KiB: held by reference, not copied
    t["big"] = big
    assert t["big"] is big
    kept = ("waiting label",)
    refs = sys.getrefcount(kept)
    t["obj"] = kept
    c = t.copy()
    assert sys.getrefcount(kept) == refs + 2 and t["obj"] is kept and c["obj"] is kept
    del c
    t["obj"] = b"replaced"
    assert sys.getrefcount(kept) == refs  # replaced and copies gone: no reference leaks
    with pytest.raises(TypeError, match="no arguments"):
        Table({"a": b""})


@pytest.mark.skipif(not COMPILED, reason="measures the compiled table")
def test_an_entry_costs_its_bytes_and_a_few_more() -> None:
    """What the index keeps per transaction (a 10-character id, ~40 bytes of entry) takes one
    allocation of header + key + value and a slot: far below a dict's str, slot and bytes object."""
    t = Table()
    for i in range(10_000):
        t[f"t{i:09d}"] = bytes(40)
    per = t.nbytes / len(t)
    assert 8 + 10 + 40 < per <= 8 + 10 + 40 + 8 * 2.7  # slots: a load between 3/8 and 3/4
    for i in range(9_990):
        del t[f"t{i:09d}"]
    assert t.nbytes < 10 * 58 + 8 * 128  # the slots shrink with the entries


@pytest.mark.skipif(not COMPILED, reason="the compiled table's blocks")
def test_entries_that_come_and_go_for_months_reuse_their_blocks() -> None:
    """The index and `pending` add an entry per transaction and drop it at its label: the freed
    blocks are handed out again, so what the process maps for entries follows what it holds, not
    what ever passed through it. (100,000 entries also take slots past 2 MiB, mapped apart.)"""
    from features._table import chunk_bytes

    t = Table()
    for i in range(100_000):
        t[f"t{i:09d}"] = bytes(40 + i % 90)
    held = chunk_bytes()
    for i in range(100_000, 500_000):
        t[f"t{i:09d}"] = bytes(40 + i % 90)
        del t[f"t{i - 100_000:09d}"]
    assert len(t) == 100_000 and t[f"t{499_999:09d}"] == bytes(40 + 499_999 % 90)
    assert held > 0 and chunk_bytes() - held <= 2 << 20  # at most one more chunk (2 MiB)
    for i in range(400_000, 500_000):
        del t[f"t{i:09d}"]
    assert len(t) == 0 and t.nbytes <= 8 * 64


AWKWARD = [0.0, -0.0, 1.0, 250.0, 251.0, 65535.0, 65536.0, -1.0, 0.5, 12.34, 1e40, -1e40, math.inf, -math.inf,
           math.nan, 3.4e38, 1e-45, 2.0**24 + 1, 16_777_216.0, 7.0000001]  # fmt: skip


@pytest.mark.parametrize("pack", ["compiled", "python"])
def test_a_packed_vector_unpacks_to_the_same_float32_values(pack: str) -> None:
    """What `pending` keeps of a scored vector gives the online model back exactly the float32
    values (what array("f") holds: signs of zeros, infinities, values that round) it was scored
    with; the compiled and the Python packers write the same bytes."""
    if pack == "compiled" and not COMPILED:
        pytest.skip("no compiled module")
    packer = table.pack_vector if pack == "compiled" else table._pack_py  # noqa: SLF001
    rnd = random.Random(3)
    rows = [
        AWKWARD,
        [],
        *([rnd.choice(AWKWARD) * rnd.choice([1, 3, 0.1]) for _ in range(51)] for _ in range(300)),
    ]
    for values in rows:
        packed = packer(values)
        assert packed == table._pack_py(values)  # noqa: SLF001
        back, want = unpack_vector(packed), array("f", values)
        assert len(back) == len(want)
        for got, exp in zip(back, want, strict=True):
            assert (math.isnan(got) and math.isnan(exp)) or (
                got == exp and math.copysign(1, got) == math.copysign(1, exp)
            )
        assert table._unpack_py(packed) == back.tobytes()  # noqa: SLF001
    with pytest.raises(TypeError):
        pack_vector(["1.0"])  # type: ignore[list-item]


def test_counts_flags_and_missing_values_pack_small() -> None:
    """A value that is NaN or an integer 0..250 takes one byte, up to 65535 three, others five."""
    assert len(pack_vector([math.nan, 0.0, 1.0, 250.0])) == 4
    assert len(pack_vector([251.0, 65535.0])) == 6 and len(pack_vector([65536.0, 0.5, -1.0, -0.0])) == 20


@pytest.mark.parametrize("unpack", ["compiled", "python"])
def test_a_damaged_packed_vector_is_refused(unpack: str) -> None:
    fn = unpack_vector if unpack == "compiled" else table._unpack_py  # noqa: SLF001
    for bad in (bytes([255, 0, 0]), bytes([1, 254, 7]), bytes([251])):
        with pytest.raises(ValueError, match="not a packed vector"):
            fn(bad)
