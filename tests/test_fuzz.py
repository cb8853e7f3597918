"""The short fuzz run: 20,000 entries, 40 % hostile, through the real flow and a real Redis
(`python -m benchmarks.fuzz` runs 100,000 and more). The books must balance exactly."""

from __future__ import annotations

import pytest

from testkit import fuzzer

pytestmark = [pytest.mark.e2e, pytest.mark.redis]


def test_fuzzed_input_never_crashes_the_flow_and_the_books_balance(redis_url: str) -> None:
    plan = fuzzer.entries(20_000, seed=7)
    assert len(plan.entries) == 20_000 and len(set(plan.kinds) & set(fuzzer.MUTATIONS)) == len(
        fuzzer.MUTATIONS
    )
    books = fuzzer.run(redis_url, plan, prefix="fz7")
    assert books.crashed is None
    assert books.records_in == books.scored + books.dead_letters + books.labels_joined, books
    assert books.scored == books.distinct_scored and books.dead_letters == books.distinct_dead_letters, books
    assert books.reasons.get("internal_error", 0) == 0, books
    assert books.tail_scored == books.tail == fuzzer.TAIL, books
    # Every documented reason a record can earn from its content alone came up.
    assert set(books.reasons) >= {
        "bad_json", "schema", "bad_amount", "bad_time", "bad_location", "unknown_kind", "too_large",
        "duplicate_txn", "unknown_txn", "duplicate_label",
    }, books.reasons  # fmt: skip
    assert books.ok


def test_the_books_catch_a_flow_that_loses_or_doubles_records() -> None:
    """The checks can fail: an unbalanced or doubled run is not ok."""
    good = fuzzer.Books(10, 5, 5, 3, 3, 2, {"bad_json": 3}, 1, 1, 0.0)
    assert good.ok
    assert not fuzzer.Books(10, 4, 4, 3, 3, 2, {"bad_json": 3}, 1, 1, 0.0).ok  # one record lost
    assert not fuzzer.Books(11, 6, 5, 3, 3, 2, {"bad_json": 3}, 1, 1, 0.0).ok  # one scored twice
    assert not fuzzer.Books(10, 5, 5, 3, 2, 2, {"bad_json": 3}, 1, 1, 0.0).ok  # a dead letter twice
    assert not fuzzer.Books(10, 5, 5, 3, 3, 2, {"internal_error": 3}, 1, 1, 0.0).ok
    assert not fuzzer.Books(10, 5, 5, 3, 3, 2, {"bad_json": 3}, 0, 1, 0.0).ok  # stopped scoring
    assert not fuzzer.Books(10, 5, 5, 3, 3, 2, {"bad_json": 3}, 1, 1, 0.0, crashed="boom").ok
