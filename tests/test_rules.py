"""The rules language: parsing, evaluation against hand-computed answers and a reference
evaluator, load errors with their lines, limits, and how hits combine with the model (`decide`)."""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from features.catalog import FEATURES
from features.events import Transaction, decode
from models.rules import (
    MAX_LINE_CHARS,
    MAX_NESTING,
    MAX_RULES,
    Hit,
    Rule,
    RuleError,
    RuleSet,
    decide,
    load_file,
)

NAMES: list[str] = list(FEATURES.names)  # the default pipeline's feature names
NAN = math.nan
EXAMPLE = """\
# name: expression -> action [dry-run]
big_burst: amount > 2000 and count_by_card_1h >= 5 -> review
trusted_merchant: merchant_id in ["m_001", "m_002"] -> allow
night_foreign: country != "US" and amount >= 500 and not (channel == "pos") -> alert
test_rule: amount > 10000 -> alert dry-run
"""


def txn(**fields: Any) -> Transaction:
    record = {
        "txn_id": "t1",
        "ts": 1_767_603_600_250,
        "card_id": "c_1",
        "merchant_id": "m_001",
        "amount": 2500,
    }
    t = decode("txn", json.dumps(record | fields))
    assert isinstance(t, Transaction), t
    return t


def vector(**named: float) -> list[float]:
    """A feature vector over the real names: NaN (missing) but for those given."""
    values = [NAN] * len(NAMES)
    for name, value in named.items():
        values[NAMES.index(name)] = value
    return values


# One transaction and one vector that every hand-computed case below reads.
T = txn(country="FR", channel="web", mcc="5411", currency="EUR", lat=48.5, lon=2.25)
V = vector(count_by_card_1h=5, amount_mean_by_card_24h=100, hour_of_day=3, is_online=1, distance_km_by_card=0)


def matches(expression: str, t: Transaction = T, values: Sequence[float] = V) -> bool:
    rules = RuleSet.parse(f"r: {expression} -> alert", NAMES)
    return rules.evaluate(t, values) == [Hit("r", "alert", False)]


def errors_of(text: str) -> list[tuple[int, str]]:
    with pytest.raises(RuleError) as caught:
        RuleSet.parse(text, NAMES)
    return caught.value.errors


def test_the_example_file() -> None:
    rules = RuleSet.parse(EXAMPLE, NAMES)
    assert len(rules) == 4 and rules.text == EXAMPLE
    assert rules.rules[0] == Rule("big_burst", "review", False, 2, "amount > 2000 and count_by_card_1h >= 5")
    assert rules.rules[2].text == 'country != "US" and amount >= 500 and not (channel == "pos")'
    assert rules.rules[3] == Rule("test_rule", "alert", True, 5, "amount > 10000")
    hits = rules.evaluate(T, V)
    assert hits == [
        Hit("big_burst", "review", False),
        Hit("trusted_merchant", "allow", False),
        Hit("night_foreign", "alert", False),
    ]
    assert decide(False, hits) == (False, "allow")
    other = txn(merchant_id="m_9", amount=12_000, country="US", channel="pos")
    assert rules.evaluate(other, V) == [Hit("big_burst", "review", False), Hit("test_rule", "alert", True)]
    assert decide(False, rules.evaluate(other, V)) == (True, "review")


# amount 2500 (field), count_by_card_1h 5, amount_mean_by_card_24h 100, hour_of_day 3, is_online 1,
# distance_km_by_card 0; country "FR", channel "web", mcc "5411", currency "EUR", lat 48.5.
@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("amount > 2000", True),
        ("amount > 2500", False),
        ("amount >= 2500", True),
        ("amount >= 2500.5", False),
        ("amount < 2500.5", True),
        ("amount < 2500", False),
        ("amount <= 2500", True),
        ("amount <= 2499.99", False),
        ("amount == 2500", True),
        ("amount == 2500.0", True),
        ("amount == 25e2", True),
        ("amount == 2501", False),
        ("amount != 2501", True),
        ("amount != 2500", False),
        ("count_by_card_1h == 5", True),
        ("5 <= count_by_card_1h", True),
        ("6 <= count_by_card_1h", False),
        ("amount > amount_mean_by_card_24h * 20", True),
        ("amount > amount_mean_by_card_24h * 25", False),
        ("amount / amount_mean_by_card_24h == 25", True),
        ("amount - amount_mean_by_card_24h == 2400", True),
        ("amount + count_by_card_1h == 2505", True),
        ("hour_of_day * 2 + 1 == 7", True),
        ("-hour_of_day == -3", True),
        ("hour_of_day > -1", True),
        ("lat == 48.5 and lon == 2.25", True),
        ("lat + lon > 50.7", True),
        ("lat + lon > 50.75", False),
        ("is_online == 1", True),
        ('country == "FR"', True),
        ("country == 'FR'", True),
        ('country == "US"', False),
        ('country != "US"', True),
        ('country != "FR"', False),
        ('"FR" == country', True),
        ('mcc == "5411"', True),
        ("merchant_id == card_id", False),
        ("merchant_id != card_id", True),
        ('country in ["US", "FR"]', True),
        ('country in ["US", "GB"]', False),
        ('country not in ["US", "GB"]', True),
        ('country not in ["FR"]', False),
        ("country in []", False),
        ("country not in []", True),
        ("count_by_card_1h in [1, 5, 7]", True),
        ("count_by_card_1h in [1.5, -5]", False),
        ("count_by_card_1h not in [1, 2]", True),
        ("-count_by_card_1h in [-5]", True),
        ('currency in ["EUR"] and channel == "web"', True),
        ("true", True),
        ("false", False),
        ("true == true", True),
        ("(amount > 1) == false", False),
        ("(amount > 1) != false", True),
        ("amount > 1 and count_by_card_1h > 10", False),
        ("amount > 1 or count_by_card_1h > 10", True),
        ("amount < 1 or count_by_card_1h > 10", False),
        ("not amount > 1", False),
        ("not (amount < 1)", True),
        ("not not amount > 1", True),
        ("amount > 1 and hour_of_day < 6 and is_online == 1 and count_by_card_1h >= 5", True),
        ("amount < 1 or hour_of_day > 6 or is_online == 0 or count_by_card_1h == 5", True),
        ('country != "#" and merchant_id != "-> alert"', True),
        ('merchant_id == "m#001"', False),
    ],
)
def test_each_operator_against_a_hand_computed_answer(expression: str, expected: bool) -> None:
    assert matches(expression) is expected


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("1 + 2 * 3 == 7", True),  # * before +
        ("(1 + 2) * 3 == 9", True),
        ("10 - 4 - 3 == 3", True),  # left to right
        ("24 / 4 / 2 == 3", True),
        ("2 * 3 / 4 == 1.5", True),
        ("8 - 2 * 3 + 1 == 3", True),
        ("-2 * 3 == -6", True),
        ("-(2 + 3) == -5", True),
        ("-2 + 3 == 1", True),  # unary minus binds tighter than +
        ("2 - -3 == 5", True),
        ("- - 2 == 2", True),
        ("true or true and false", True),  # and before or: true or (true and false)
        ("false and true or true", True),
        ("(true or true) and false", False),
        ("not false and false", False),  # not before and: (not false) and false
        ("not (false and false)", True),
        ("not false or true", True),
        ("not 1 > 2", True),  # comparison before not
        ("not 1 + 1 == 2", False),
        ("1 + 1 == 2 and 2 * 2 == 4", True),
        ("(1 < 2) == true", True),  # comparisons do not chain: `1 < 2 == true` is refused
    ],
)
def test_precedence(expression: str, expected: bool) -> None:
    assert matches(expression) is expected


def test_missing_values_make_comparisons_false_and_not_negates() -> None:
    t = txn()  # no country, channel, device, lat/lon
    v = vector()  # every feature missing
    for expression in [
        "speed_kmh_by_card > 0",
        "speed_kmh_by_card <= 0",
        "speed_kmh_by_card == speed_kmh_by_card",
        "speed_kmh_by_card != 1",
        "1 != speed_kmh_by_card",
        "speed_kmh_by_card != speed_kmh_by_card",
        "speed_kmh_by_card + 1 > 0",
        "speed_kmh_by_card * 0 == 0",
        "-speed_kmh_by_card < 0",
        "speed_kmh_by_card in [1, 2]",
        "speed_kmh_by_card not in [1, 2]",
        "lat > -100",
        "lat != 0",
        "lat not in [0]",
        'country == "US"',
        'country != "US"',
        '"US" != country',
        'country in ["US"]',
        'country not in ["US"]',
        "device_id == ip",
        "device_id != ip",
        "device_id != merchant_id",
    ]:
        assert not matches(expression, t, v), expression
    for expression in [
        "not speed_kmh_by_card > 0",
        "not speed_kmh_by_card <= 0",
        'not country == "US"',
        'not (country != "US")',
        "amount > 0 and not lat > 0",
        "lat > 0 or amount > 0",
        "merchant_id != card_id",  # present fields compare as usual
    ]:
        assert matches(expression, t, v), expression


def test_division_by_zero_makes_the_comparison_false_and_never_raises() -> None:
    for expression in [
        "amount / 0 > 0",
        "amount / 0 < 0",
        "amount / 0 != 1",
        "amount / 0 == amount / 0",
        "1 / 0 > 0",
        "0 / 0 != 1",
        "amount / distance_km_by_card > 1",
        "amount / (count_by_card_1h - 5) >= 0",
        "amount / (count_by_card_1h - 5) * 0 == 0",
        "amount / distance_km_by_card in [1]",
        "amount / distance_km_by_card not in [1]",
        "2 * amount / (hour_of_day - 3) + 1 > 0",
    ]:
        assert not matches(expression), expression
    assert matches("not (amount / 0 > 1)")
    assert matches("amount / 0 > 1 or amount > 0")
    assert matches("amount / count_by_card_1h == 500")  # a non-zero divisor divides


def test_a_name_that_is_both_a_field_and_a_feature_reads_the_field() -> None:
    assert "amount" in NAMES
    v = vector(amount=1.0)
    assert matches("amount == 2500", values=v)
    assert not matches("amount == 1", values=v)


def test_an_empty_or_comment_only_text_is_an_empty_set() -> None:
    for text in ["", "\n\n", "# nothing yet\n   \n\t# still nothing\n"]:
        rules = RuleSet.parse(text, NAMES)
        assert len(rules) == 0 and rules.rules == ()
        assert rules.evaluate(T, V) == []


def test_the_text_is_read_line_by_line() -> None:
    rules = RuleSet.parse("\r\n  a :amount>1->review dry-run  # note\r\n\n\tb: true->allow\n", NAMES)
    assert rules.rules == (
        Rule("a", "review", True, 2, "amount>1"),
        Rule("b", "allow", False, 4, "true"),
    )
    assert rules.evaluate(T, V) == [Hit("a", "review", True), Hit("b", "allow", False)]


def test_a_rule_set_pickles_as_its_text() -> None:
    rules = RuleSet.parse(EXAMPLE, NAMES)
    again = pickle.loads(pickle.dumps(rules))
    assert (again.text, again.digest, again.rules) == (rules.text, rules.digest, rules.rules)
    assert again.evaluate(T, V) == rules.evaluate(T, V)


def test_the_digest_is_the_sha256_of_the_text() -> None:
    a = RuleSet.parse(EXAMPLE, NAMES)
    assert a.digest == hashlib.sha256(EXAMPLE.encode()).hexdigest()
    assert RuleSet.parse(EXAMPLE, NAMES).digest == a.digest
    assert RuleSet.parse(EXAMPLE + "# a comment\n", NAMES).digest != a.digest
    assert RuleSet.parse(EXAMPLE.replace("2000", "2001"), NAMES).digest != a.digest
    assert RuleSet.parse("", NAMES).digest == hashlib.sha256(b"").hexdigest()


BAD_LINES = [
    ("r: amout > 1 -> alert", "unknown name 'amout' (did you mean 'amount'?)"),
    (
        "r: count_by_card_1hr > 1 -> alert",
        "unknown name 'count_by_card_1hr' (did you mean 'count_by_card_1h'?)",
    ),
    ("r: __import__('os') -> alert", "unknown name '__import__'"),
    ("r: amount.real > 1 -> alert", "unexpected character '.' at column 10"),
    ("r: country == 5 -> alert", "'==' at column 12 compares a string ('country') with a number (5)"),
    ("r: mcc == 5411 -> alert", 'write the number in quotes: "5411"'),
    ('r: amount == "5" -> alert', "compares a number ('amount') with a string"),
    (
        "r: is_online == true -> alert",
        "compares a number ('is_online') with a condition (true) (flags are numbers: compare them with 1 or 0)",
    ),
    ("r: amount == [1] -> alert", "cannot compare a list (use 'in')"),
    ('r: country in "US" -> alert', "'in' at column 12 needs a list on its right"),
    ('r: amount in ["1"] -> alert', "looks for a number ('amount') in a list of strings"),
    ("r: country not in [1] -> alert", "looks for a string ('country') in a list of numbers"),
    ('r: amount in [1, "a"] -> alert', "the list at column 14 mixes numbers and strings"),
    ("r: amount in [count_by_card_1h] -> alert", "a list holds literals only"),
    ('r: country > "A" -> alert', "'>' at column 12 orders numbers only"),
    ("r: amount -> alert", "the expression 'amount' is a number, not a condition"),
    ("r: amount + country > 1 -> alert", "'+' at column 11 needs numbers, not a string ('country')"),
    ("r: not amount -> alert", "'not' at column 4 needs a condition, not a number"),
    ('r: -country == "x" -> alert', "unary '-' at column 4 needs a number"),
    ("r: amount > 1 and 5 -> alert", "'and' joins conditions, not a number (5)"),
    ("r: 1 < amount < 3 -> alert", "comparisons do not chain"),
    ("r: (amount > 1 -> alert", "expected ')' to close '(' at column 4"),
    ("r: amount > -> alert", "expected a value at column 13, found '->'"),
    ("r: amount > 1 -> block", "unknown action 'block' (expected alert, review or allow)"),
    ("r: amount > 1 ->", "unknown action nothing"),
    ("r: amount > 1 alert", "expected '->' and an action, found 'alert' at column 15"),
    ("r: amount > 1 -> alert now", "unexpected 'now' at column 24 after the action"),
    ("r: amount > 1 -> alert dry - run", "unexpected 'dry'"),
    ("r: amount = 1 -> alert", "unexpected '=' at column 11 (compare with '==')"),
    ('r: country == "US -> alert', "unterminated string starting at column 15"),
    ("r: amount > 1.2.3 -> alert", "bad number at column 13"),
    ("r: amount > 1 && amount < 5 -> alert", "unexpected character '&'"),
    ("amount > 1 -> alert", "expected 'name: expression -> action'"),
    ("2fast: amount > 1 -> alert", "bad rule name '2fast'"),
    (": amount > 1 -> alert", "the rule has no name"),
    ("r: -> alert", "rule 'r' has no expression"),
    ("ok: amount > 2 -> alert", "duplicate rule name 'ok' (first defined on line 2)"),
]


@pytest.mark.parametrize(("line", "reason"), BAD_LINES, ids=[line for line, _ in BAD_LINES])
def test_each_kind_of_bad_line_is_refused_with_its_line_and_reason(line: str, reason: str) -> None:
    errors = errors_of(f"# header\nok: amount > 1 -> alert\n{line}\n")
    assert len(errors) == 1 and errors[0][0] == 3, errors
    assert reason in errors[0][1], errors[0][1]


def test_every_bad_line_is_reported_at_once() -> None:
    text = "\n".join(["# rules", *(line for line, _ in BAD_LINES), "last: amount > 1 -> alert"])
    with pytest.raises(RuleError) as caught:
        RuleSet.parse(text, NAMES, source="team.rules")
    duplicate = next(i for i, (line, _) in enumerate(BAD_LINES) if line.startswith("ok:"))
    expected = [i + 2 for i in range(len(BAD_LINES)) if i != duplicate]
    assert [line for line, _ in caught.value.errors] == expected  # 'ok' is first defined there
    message = str(caught.value).splitlines()
    assert len(message) == len(expected)
    assert message[0] == "team.rules: line 2: unknown name 'amout' (did you mean 'amount'?)"
    assert all(m.startswith("team.rules: line ") for m in message)
    assert isinstance(caught.value, ValueError)
    again = pickle.loads(pickle.dumps(caught.value))
    assert again.errors == caught.value.errors and str(again) == str(caught.value)


def test_the_limits() -> None:
    many = "".join(f"r{i}: amount > {i} -> alert\n" for i in range(MAX_RULES))
    assert len(RuleSet.parse(many, NAMES)) == MAX_RULES
    assert errors_of(many + "# comment\none_more: true -> alert\nanother: true -> alert\n") == [
        (MAX_RULES + 2, f"more than {MAX_RULES} rules; at most {MAX_RULES} are allowed")
    ]

    fits = "r: " + "1 + " * ((MAX_LINE_CHARS - 20) // 4) + "1 > 0 -> alert"
    assert len(fits) <= MAX_LINE_CHARS and matches(fits[3:].removesuffix(" -> alert"))
    long = "r: amount > 1 -> alert" + " " * (MAX_LINE_CHARS - 22 + 1)
    assert errors_of(f"\n{long}") == [
        (2, f"line is {MAX_LINE_CHARS + 1} characters long; at most 2000 are allowed")
    ]

    n = MAX_NESTING  # parentheses, `not`, unary minus and list brackets each count a level
    even = n % 2 == 0
    for fits, expected, deeper in [
        ("(" * n + "amount > 1" + ")" * n, True, "(" * (n + 1) + "amount > 1" + ")" * (n + 1)),
        ("not " * n + "true", even, "not " * (n + 1) + "true"),
        ("- " * n + "1 == 1", even, "- " * (n + 1) + "1 == 1"),
        (
            "(not " * (n // 2) + "false" + ")" * (n // 2),
            n // 2 % 2 == 1,
            "(not " * (n // 2) + "(false)" + ")" * (n // 2),
        ),
        ("(" * (n - 1) + "amount in [2500]" + ")" * (n - 1), True, "(" * n + "amount in [2500]" + ")" * n),
    ]:
        assert matches(fits) is expected, fits
        [(line, reason)] = errors_of(f"\n\nr: {deeper} -> alert")
        assert line == 3 and reason.startswith(f"expression nested deeper than {n} levels"), reason


@pytest.mark.parametrize(
    ("model_alert", "actions", "expected"),
    [
        (False, [], (False, "none")),
        (True, [], (True, "alert")),
        (False, ["review"], (True, "review")),
        (True, ["review"], (True, "alert")),
        (False, ["alert"], (True, "alert")),
        (False, ["review", "alert"], (True, "alert")),
        (True, ["allow"], (False, "allow")),
        (False, ["allow"], (False, "allow")),
        (False, ["alert", "review", "allow"], (False, "allow")),
        (True, ["allow*"], (True, "alert")),  # * = dry-run: reported, never decides
        (False, ["alert*"], (False, "none")),
        (False, ["review*", "alert*"], (False, "none")),
        (False, ["review*", "review"], (True, "review")),
        (False, ["allow*", "review"], (True, "review")),
    ],
)
def test_decide(model_alert: bool, actions: list[str], expected: tuple[bool, str]) -> None:
    hits = [Hit(f"r{i}", a.rstrip("*"), a.endswith("*")) for i, a in enumerate(actions)]
    assert decide(model_alert, hits) == expected


def test_dry_run_hits_are_reported_but_do_not_decide() -> None:
    rules = RuleSet.parse("block: amount > 1 -> alert dry-run\nlet: true -> allow dry-run\n", NAMES)
    hits = rules.evaluate(T, V)
    assert hits == [Hit("block", "alert", True), Hit("let", "allow", True)]
    assert decide(False, hits) == (False, "none")
    assert decide(True, hits) == (True, "alert")


def test_load_file(tmp_path: Path) -> None:
    good = tmp_path / "good.rules"
    good.write_text(EXAMPLE)
    rules = load_file(good, NAMES)
    assert len(rules) == 4 and rules.digest == RuleSet.parse(EXAMPLE, NAMES).digest

    bad = tmp_path / "bad.rules"
    bad.write_text("a: amount > 1 -> alert\nb: amout > 1 -> alert\n")
    with pytest.raises(RuleError, match=rf"^{bad}: line 2: unknown name 'amout'") as caught:
        load_file(bad, NAMES)
    assert caught.value.errors == [(2, "unknown name 'amout' (did you mean 'amount'?)")]

    with pytest.raises(RuleError, match=rf"^{tmp_path / 'missing.rules'}: cannot read the rule file"):
        load_file(tmp_path / "missing.rules", NAMES)

    binary = tmp_path / "binary.rules"
    binary.write_bytes(b'a: true -> alert\nb: country == "\xff" -> alert\n')
    with pytest.raises(RuleError, match=rf"^{binary}: line 2: not UTF-8"):
        load_file(binary, NAMES)


DOC = Path(__file__).resolve().parents[1] / "docs" / "rules.md"


def doc_blocks() -> list[list[str]]:
    """The lines of each fenced block of docs/rules.md."""
    blocks: list[list[str]] = []
    inside = False
    for line in DOC.read_text().splitlines():
        if line.startswith("```"):
            inside = not inside
            if inside:
                blocks.append([line])
        elif inside:
            blocks[-1].append(line)
    return blocks


def test_the_rules_in_the_docs_parse() -> None:
    texts = ["\n".join(b[1:]) for b in doc_blocks() if b[0] == "```" and " -> " in "\n".join(b)]
    texts = [t for t in texts if not t.startswith("team.rules:")]
    assert len(texts) >= 3
    assert sum(len(RuleSet.parse(text, NAMES)) for text in texts) >= 10
    assert EXAMPLE.strip() in texts


def test_the_load_errors_in_the_docs_are_what_the_parser_says() -> None:
    [documented] = [b[1:] for b in doc_blocks() if len(b) > 1 and b[1].startswith("team.rules:")]
    lines = [
        "# team rules",
        "ok: amount > 1 -> alert",
        "a: amout > 100 -> alert",
        "b: mcc == 5411 -> review",
        "",
        'c: country in "US" -> alert',
        "d: amount > 1 -> allow",
        "",
        "e: amount -> alert",
        "",
        "f: amount > 1 -> block",
    ]
    with pytest.raises(RuleError) as caught:
        RuleSet.parse("\n".join(lines), NAMES, source="team.rules")
    assert str(caught.value).splitlines() == documented


def test_evaluate_refuses_a_vector_of_another_length() -> None:
    rules = RuleSet.parse(EXAMPLE, NAMES)
    with pytest.raises(ValueError, match=f"parsed for {len(NAMES)} features, got 3"):
        rules.evaluate(T, [1.0, 2.0, 3.0])


def test_evaluation_takes_microseconds() -> None:
    rules = RuleSet.parse(EXAMPLE, NAMES)
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(2000):
            rules.evaluate(T, V)
        best = min(best, (time.perf_counter() - start) / 2000)
    assert best < 200e-6  # ~2 µs on a laptop; the bound only catches an accidental slow path


# --- the evaluator against a straightforward Python reference on random expressions -------------

# Precedence levels of what a node renders as: or < and < not < comparison < +- < */ < unary < atom.
OR, AND, NOT, CMP, SUM, PRODUCT, UNARY, ATOM = range(1, 9)
FEATURES_USED = ["count_by_card_1h", "amount_mean_by_card_24h", "hour_of_day", "speed_kmh_by_card"]
LEVEL = {"+": SUM, "-": SUM, "*": PRODUCT, "/": PRODUCT, "and": AND, "or": OR}


def number_tree(rng: random.Random, depth: int) -> Any:
    if depth == 0 or rng.random() < 0.25:
        if rng.random() < 0.5:
            return ("lit", float(rng.choice([0, 1, 2, 3, 5, -1, -2, 0.5, 2.5])))
        return ("var", rng.choice([*FEATURES_USED, "amount", "lat"]))
    if rng.random() < 0.15:
        return ("neg", number_tree(rng, depth - 1))
    return ("bin", rng.choice("+-*/"), number_tree(rng, depth - 1), number_tree(rng, depth - 1))


def bool_tree(rng: random.Random, depth: int) -> Any:
    roll = rng.random()
    if depth == 0 or roll < 0.3:
        if rng.random() < 0.2:
            return (
                "in",
                rng.random() < 0.5,
                number_tree(rng, 2),
                [float(rng.choice([0, 1, 2, 3, -1])) for _ in range(3)],
            )
        return (
            "cmp",
            rng.choice(["<", "<=", ">", ">=", "==", "!="]),
            number_tree(rng, 2),
            number_tree(rng, 2),
        )
    if roll < 0.35:
        return ("const", rng.random() < 0.5)
    if roll < 0.5:
        return ("not", bool_tree(rng, depth - 1))
    return (rng.choice(["and", "or"]), bool_tree(rng, depth - 1), bool_tree(rng, depth - 1))


def number_text(x: float) -> str:
    return repr(x) if x >= 0 else f"-{-x!r}"


class Renderer:
    """Text for a tree with only the parentheses its precedence needs (and a few redundant ones).
    `relies` counts the places where a wrong precedence would read the text as another tree."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.relies = 0

    def render(self, node: Any) -> tuple[str, int]:
        text, level = self._render(node)
        if self.rng.random() < 0.05:
            return f"({text})", ATOM
        return text, level

    def operand(self, node: Any, parent: int, tight: bool) -> str:
        """`node` as an operand of an operator at level `parent`; `tight`: same level needs parens."""
        text, level = self.render(node)
        if level < parent or (tight and level == parent):
            return f"({text})"
        if parent < level < ATOM:
            self.relies += 1
        return text

    def _render(self, node: Any) -> tuple[str, int]:
        kind = node[0]
        if kind == "lit":
            return number_text(node[1]), ATOM if node[1] >= 0 else UNARY
        if kind == "var":
            return node[1], ATOM
        if kind == "const":
            return ("true" if node[1] else "false"), ATOM
        if kind == "neg":
            return "-" + self.operand(node[1], UNARY, False), UNARY
        if kind == "bin":
            level = LEVEL[node[1]]
            return (
                f"{self.operand(node[2], level, False)} {node[1]} {self.operand(node[3], level, True)}",
                level,
            )
        if kind == "cmp":
            return f"{self.operand(node[2], CMP, True)} {node[1]} {self.operand(node[3], CMP, True)}", CMP
        if kind == "in":
            items = ", ".join(number_text(x) for x in node[3])
            return f"{self.operand(node[2], CMP, True)} {'not in' if node[1] else 'in'} [{items}]", CMP
        if kind == "not":
            return "not " + self.operand(node[1], NOT, False), NOT
        level = LEVEL[kind]  # and/or: associative, so a same-level right operand needs no parens
        return f"{self.operand(node[1], level, False)} {kind} {self.operand(node[2], level, False)}", level


def reference(node: Any, env: dict[str, float]) -> Any:
    """The meaning of a tree, in plain Python: NaN for missing, x/0 is NaN, a comparison with a
    NaN operand is false, `not` negates."""
    kind = node[0]
    if kind == "lit":
        return node[1]
    if kind == "var":
        return env[node[1]]
    if kind == "const":
        return node[1]
    if kind == "neg":
        return -reference(node[1], env)
    if kind == "bin":
        a, b = reference(node[2], env), reference(node[3], env)
        op = node[1]
        return (
            a + b if op == "+" else a - b if op == "-" else a * b if op == "*" else (NAN if b == 0 else a / b)
        )
    if kind == "cmp":
        a, b = reference(node[2], env), reference(node[3], env)
        if math.isnan(a) or math.isnan(b):
            return False
        return {"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b, "==": a == b, "!=": a != b}[node[1]]
    if kind == "in":
        a = reference(node[2], env)
        return not math.isnan(a) and ((a not in node[3]) if node[1] else (a in node[3]))
    if kind == "not":
        return not reference(node[1], env)
    if kind == "and":
        return reference(node[1], env) and reference(node[2], env)
    return reference(node[1], env) or reference(node[2], env)


def environments(rng: random.Random, n: int) -> list[tuple[Transaction, list[float], dict[str, float]]]:
    pool = [0.0, 1.0, 2.0, 3.0, -1.0, 0.5, 2.5, 7.0, NAN]
    found = []
    for _ in range(n):
        env = {name: rng.choice(pool) for name in FEATURES_USED}
        env["amount"] = rng.choice([0.0, 1.0, 2.0, 12.5, 300.0])
        env["lat"] = rng.choice([NAN, 0.0, -33.5, 48.25])
        t = txn(amount=env["amount"], **({} if math.isnan(env["lat"]) else {"lat": env["lat"], "lon": 1.0}))
        found.append((t, vector(**{name: env[name] for name in FEATURES_USED}), env))
    return found


def test_the_evaluator_agrees_with_a_python_reference_on_random_expressions() -> None:
    rng = random.Random(20240607)
    renderer = Renderer(rng)
    envs = environments(rng, 10)
    checked = relying = outcomes = 0
    for _ in range(2):
        trees = [bool_tree(rng, 4) for _ in range(MAX_RULES)]
        lines = []
        for i, tree in enumerate(trees):
            before = renderer.relies
            lines.append(f"r{i}: {renderer.render(tree)[0]} -> alert")
            relying += renderer.relies > before
        rules = RuleSet.parse("\n".join(lines), NAMES)
        for t, v, env in envs:
            got = {hit.rule for hit in rules.evaluate(t, v)}
            want = {f"r{i}" for i, tree in enumerate(trees) if reference(tree, env)}
            wrong = sorted(got ^ want, key=lambda r: int(r[1:]))[:3]
            assert not wrong, [(lines[int(r[1:])], env) for r in wrong]
            checked += len(trees)
            outcomes += len(want)
    # The cases discriminate: many texts lean on precedence, and both outcomes are common.
    assert relying > 0.3 * 2 * MAX_RULES
    assert 0.2 < outcomes / checked < 0.8


def test_arithmetic_is_exact_against_the_reference() -> None:
    """`expression == value` for the reference's value (repr round-trips a float): every operator,
    its precedence and associativity, to the last bit."""
    rng = random.Random(7)
    renderer = Renderer(rng)
    envs = environments(rng, 4)
    for t, v, env in envs:
        trees = [number_tree(rng, 4) for _ in range(600)]
        values = [reference(tree, env) for tree in trees]
        lines = [
            f"r{i}: {renderer.render(tree)[0]} == {number_text(value)} -> alert"
            for i, (tree, value) in enumerate(zip(trees, values, strict=True))
            if math.isfinite(value)
        ]
        assert len(lines) > 150
        rules = RuleSet.parse("\n".join(lines), NAMES)
        assert len(rules.evaluate(t, v)) == len(lines), [
            line for line, rule in zip(lines, rules.rules, strict=True) if not matches_rule(rules, rule, t, v)
        ][:3]


def matches_rule(rules: RuleSet, rule: Rule, t: Transaction, v: list[float]) -> bool:
    return any(hit.rule == rule.name for hit in rules.evaluate(t, v))


def test_any_line_is_a_rule_or_a_rule_error() -> None:
    """Token soup never escapes as another exception, and what parses evaluates without raising."""
    # fmt: off
    vocab = [
        "amount", "lat", "country", "mcc", "count_by_card_1h", "speed_kmh_by_card", "1", "0", "0.5",
        "1e400", "1.2.3", "5e", "-", "+", "*", "/", "(", ")", "[", "]", ",", "and", "or", "not", "in",
        "==", "!=", "<", ">=", "=", "!", "@", ".", "#", ":", "->", "alert", "allow", "review", "dry-run",
        '"US"', "'x'", '"', "true", "false", "r:",
    ]
    # fmt: on
    rng = random.Random(3)
    envs = environments(rng, 2)
    for _ in range(2000):
        tokens = [rng.choice(vocab) for _ in range(rng.randint(0, 12))]
        line = (
            ("r: " if rng.random() < 0.9 else "")
            + " ".join(tokens)
            + (" -> alert" if rng.random() < 0.8 else "")
        )
        try:
            rules = RuleSet.parse(line, NAMES)
        except RuleError as e:
            assert len(e.errors) == 1 and e.errors[0][0] == 1 and e.errors[0][1], line
            continue
        for t, v, _ in envs:
            rules.evaluate(t, v)
