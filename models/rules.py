"""Declarative rules beside the model: `name: expression -> action [dry-run]`, one per line.

A rule set is parsed once (`RuleSet.parse`, `load_file`) and compiled into plain Python closures:
every identifier is resolved at load time to a transaction field or to an index in the feature
vector, and every type error that can be seen in the text (an unknown name, a string compared with
a number, `in` with something that is not a list...) is refused then, with its line. Evaluating a
rule afterwards costs a few closure calls and never raises: a missing value (a NaN feature, a
field that is None) makes a comparison false, and so does a division by zero.

The language is read by a small tokenizer and a recursive-descent parser; nothing in a rule's text
is ever handed to `eval`, `exec` or `ast`. The grammar, the actions and their precedence are
documented in docs/rules.md; `decide` combines the model's alert with the rules' hits.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, NamedTuple

from features.events import Transaction

ACTIONS: Final = ("alert", "review", "allow")
"""What a rule does when it matches: `alert` raises an alert whatever the model says, `review`
raises one whose action is review, `allow` suppresses the model's alert (see `decide`)."""

TXN_NUMBERS: Final = ("amount", "lat", "lon")
"""The numeric transaction fields a rule may name (`lat`/`lon` may be missing)."""
TXN_STRINGS: Final = ("currency", "mcc", "country", "channel", "merchant_id", "card_id", "device_id", "ip")
"""The string transaction fields a rule may name (all but `merchant_id` and `card_id` may be missing)."""

MAX_RULES: Final = 1000
MAX_LINE_CHARS: Final = 2000
MAX_NESTING: Final = 50
"""The deepest an expression may nest: parentheses, `not`, unary minus and list brackets each
count one level (so evaluation and parsing never recurse deep, whatever the text)."""
MAX_REPORTED: Final = 200  # bad lines spelled out in a RuleError's message (`errors` keeps all)

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HEAD = re.compile(r"\s*([^\s:]*)\s*:")
_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<comment>\#.*)
  | (?P<number>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?(?![A-Za-z0-9_.]))
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<string>"[^"]*"|'[^']*')
  | (?P<op>->|<=|>=|==|!=|[<>+\-*/()\[\],])
    """,
    re.VERBOSE,
)
_KEYWORDS = frozenset({"and", "or", "not", "in", "true", "false"})
_COMPARISONS = ("<", "<=", ">", ">=", "==", "!=")

Kind = Literal["number", "string", "bool", "list"]
Fn = Callable[[Transaction, Sequence[float]], Any]
NAN = math.nan


class RuleError(ValueError):
    """A rule text that cannot be loaded. `errors` holds every bad line as (line, reason), line
    numbers 1-based (0 for a problem with the whole file); the message spells them out, one a line,
    each prefixed with the source (`rules.txt: line 3: unknown name 'amout' (did you mean
    'amount'?)`)."""

    def __init__(self, errors: Sequence[tuple[int, str]], source: str = "<rules>") -> None:
        self.errors: list[tuple[int, str]] = list(errors)
        self.source = source
        lines = [
            f"{source}: line {line}: {reason}" if line else f"{source}: {reason}"
            for line, reason in self.errors[:MAX_REPORTED]
        ]
        if len(self.errors) > MAX_REPORTED:
            lines.append(f"{source}: ... and {len(self.errors) - MAX_REPORTED} more bad lines")
        super().__init__("\n".join(lines))

    def __reduce__(self) -> tuple[type[RuleError], tuple[list[tuple[int, str]], str]]:
        return (type(self), (self.errors, self.source))


@dataclass(frozen=True)
class Rule:
    """One parsed rule: `text` is its expression as written (between the colon and the arrow)."""

    name: str
    action: str
    dry_run: bool
    line: int
    text: str


@dataclass(frozen=True)
class Hit:
    """A rule that matched one transaction."""

    rule: str
    action: str
    dry_run: bool


class RuleSet:
    """A parsed, compiled rule set; build it with `RuleSet.parse` or `load_file`."""

    __slots__ = ("_checks", "_names", "_source", "digest", "rules", "text")

    def __init__(
        self,
        text: str,
        rules: tuple[Rule, ...],
        checks: tuple[tuple[Fn, Hit], ...],
        names: tuple[str, ...],
        source: str,
    ) -> None:
        self.text = text
        self.rules = rules
        self.digest = digest(text)
        self._checks = checks
        self._names = names
        self._source = source

    @classmethod
    def parse(cls, text: str, feature_names: Sequence[str], *, source: str = "<rules>") -> RuleSet:
        """Parse and compile `text` against the feature vector's names (`pipeline.names`).

        Raises `RuleError` listing every bad line. An empty text (or only comments) is a valid
        empty set. A name that is both a transaction field and a feature (`amount`) reads the field.
        """
        names: dict[str, int] = {}
        for i, name in enumerate(feature_names):
            names.setdefault(name, i)
        errors: list[tuple[int, str]] = []
        rules: list[Rule] = []
        checks: list[tuple[Fn, Hit]] = []
        first_line: dict[str, int] = {}
        too_many = False
        for number, raw in enumerate(text.split("\n"), start=1):
            line = raw.removesuffix("\r")
            if len(line) > MAX_LINE_CHARS:
                errors.append(
                    (number, f"line is {len(line)} characters long; at most {MAX_LINE_CHARS} are allowed")
                )
                continue
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            head = _HEAD.match(line)
            name = head.group(1) if head else ""
            duplicate = name in first_line
            if name and not duplicate:
                first_line[name] = number
            try:
                if head is None:
                    raise _Bad("expected 'name: expression -> action'")
                expression, fn, action, dry_run = _parse_line(line, head, names)
                if duplicate:
                    raise _Bad(f"duplicate rule name {name!r} (first defined on line {first_line[name]})")
            except _Bad as e:
                errors.append((number, str(e)))
                continue
            if len(rules) == MAX_RULES:
                if not too_many:
                    errors.append((number, f"more than {MAX_RULES} rules; at most {MAX_RULES} are allowed"))
                    too_many = True
                continue
            rules.append(Rule(name, action, dry_run, number, expression))
            checks.append((fn, Hit(name, action, dry_run)))
        if errors:
            raise RuleError(errors, source)
        return cls(text, tuple(rules), tuple(checks), tuple(feature_names), source)

    def evaluate(self, txn: Transaction, values: Sequence[float]) -> list[Hit]:
        """The rules that match `txn` with feature vector `values`, in file order, dry-run ones
        included. `values` must be as long as the names the set was parsed with (ValueError)."""
        if len(values) != len(self._names):
            raise ValueError(
                f"the rule set was parsed for {len(self._names)} features, got {len(values)} values"
            )
        return [hit for check, hit in self._checks if check(txn, values)]

    def __len__(self) -> int:
        return len(self.rules)

    @property
    def source(self) -> str:
        """Where the text came from (a file name): what its errors and the flow's logs name."""
        return self._source

    def __reduce__(self) -> tuple[Callable[..., RuleSet], tuple[str, tuple[str, ...], str]]:
        """Pickled as its text and feature names (closures do not pickle), parsed again on load."""
        return (_reparsed, (self.text, self._names, self._source))

    def __repr__(self) -> str:
        return f"RuleSet({len(self.rules)} rules, digest={self.digest[:12]})"


def _reparsed(text: str, names: tuple[str, ...], source: str) -> RuleSet:
    return RuleSet.parse(text, names, source=source)


def digest(text: str) -> str:
    """The sha256 (hex) of a rule text's UTF-8 bytes: what identifies a rule set."""
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()


def decide(model_alert: bool, hits: Sequence[Hit]) -> tuple[bool, str]:
    """(alert, action) from the model's alert and the rules' hits, dry-run hits ignored: any `allow`
    hit gives (False, "allow"); else an `alert` hit or the model's alert gives (True, "alert"); else
    a `review` hit gives (True, "review"); else (False, "none")."""
    actions = {hit.action for hit in hits if not hit.dry_run}
    if "allow" in actions:
        return False, "allow"
    if model_alert or "alert" in actions:
        return True, "alert"
    if "review" in actions:
        return True, "review"
    return False, "none"


def load_file(path: Path, feature_names: Sequence[str]) -> RuleSet:
    """The rule set in file `path` (UTF-8). A file that cannot be read or parsed raises `RuleError`,
    its message prefixed with the path."""
    source = str(path)
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as e:
        raise RuleError([(0, f"cannot read the rule file: {e.strerror or e}")], source) from e
    except UnicodeDecodeError as e:
        line = e.object[: e.start].count(b"\n") + 1
        raise RuleError([(line, f"not UTF-8 (byte {e.object[e.start]:#04x})")], source) from e
    return RuleSet.parse(text, feature_names, source=source)


# --- parsing ----------------------------------------------------------------------------------


class _Bad(Exception):
    """Why one line is refused (becomes one entry of RuleError.errors)."""


class _Tok(NamedTuple):
    kind: str  # "number", "name", "keyword", "string", "op", "end"
    text: str
    col: int  # 1-based column in the line

    def show(self) -> str:
        return "the end of the line" if self.kind == "end" else repr(self.text)


def _tokenize(line: str, start: int) -> list[_Tok]:
    tokens: list[_Tok] = []
    pos = start
    while pos < len(line):
        m = _TOKEN.match(line, pos)
        if m is None:
            if line[pos] in "\"'":
                raise _Bad(f"unterminated string starting at column {pos + 1}")
            if line[pos].isdigit() or line[pos : pos + 2] in {f".{d}" for d in "0123456789"}:
                raise _Bad(f"bad number at column {pos + 1}")
            if line[pos] == "=":
                raise _Bad(f"unexpected '=' at column {pos + 1} (compare with '==')")
            raise _Bad(f"unexpected character {line[pos]!r} at column {pos + 1}")
        kind = m.lastgroup or ""
        if kind == "comment":
            break
        if kind == "name" and m.group() in _KEYWORDS:
            kind = "keyword"
        if kind != "space":
            tokens.append(_Tok(kind, m.group(), pos + 1))
        pos = m.end()
    tokens.append(_Tok("end", "", len(line) + 1))
    return tokens


def _parse_line(line: str, head: re.Match[str], names: dict[str, int]) -> tuple[str, Fn, str, bool]:
    """(expression text, compiled check, action, dry_run) of a rule line whose `name:` is `head`."""
    name = head.group(1)
    if not name:
        raise _Bad("the rule has no name (expected 'name: expression -> action')")
    if not _NAME.fullmatch(name):
        raise _Bad(f"bad rule name {name!r} (letters, digits and '_', not starting with a digit)")
    tokens = _tokenize(line, head.end())
    parser = _Parser(tokens, names)
    if tokens[0].text == "->" or tokens[0].kind == "end":
        raise _Bad(f"rule {name!r} has no expression")
    node = parser.expression()
    arrow = parser.peek()
    if arrow.text != "->" or arrow.kind != "op":
        raise _Bad(f"expected '->' and an action, found {arrow.show()} at column {arrow.col}")
    expression = line[head.end() : arrow.col - 1].strip()
    parser.next()
    action_tok = parser.next()
    if action_tok.kind != "name" or action_tok.text not in ACTIONS:
        found = "nothing" if action_tok.kind == "end" else repr(action_tok.text)
        raise _Bad(f"unknown action {found} (expected alert, review or allow)")
    rest = parser.tokens[parser.pos : parser.pos + 3]
    dry_run = [t.text for t in rest] == ["dry", "-", "run"] and rest[2].col - rest[0].col == 4
    if dry_run:
        parser.pos += 3
    extra = parser.peek()
    if extra.kind != "end":
        raise _Bad(
            f"unexpected {extra.show()} at column {extra.col} after the action (only 'dry-run' may follow)"
        )
    if node.kind != "bool":
        raise _Bad(
            f"the expression {node.what} is {_a(node.kind)}, not a condition (compare it with something)"
        )
    return expression, node.fn, action_tok.text, dry_run


class _NoConst:
    def __repr__(self) -> str:
        return "<not constant>"


_NO_CONST: Final = _NoConst()


@dataclass(frozen=True)
class _Node:
    """A compiled (sub)expression: its static type, its closure, its value when constant, and how
    to name it in a message. A list's `items` holds its (constant) elements."""

    kind: Kind
    fn: Fn
    what: str
    const: Any = _NO_CONST
    elem: Kind | None = None  # a list's element type (None: empty)
    items: frozenset[Any] = frozenset()
    field: str = ""  # "feature", "txn" or "" (how an identifier is read; for fast paths)
    index: int = -1  # a feature's index


def _a(kind: str) -> str:
    return {"number": "a number", "string": "a string", "bool": "a condition", "list": "a list"}[kind]


_PLURAL: Final = {"number": "numbers", "string": "strings", "bool": "true/false", "list": "lists"}


def _constant(kind: Kind, value: Any, what: str) -> _Node:
    return _Node(kind, lambda t, v: value, what, const=value)


class _Parser:
    """Recursive descent over one line's tokens, compiling as it goes:

    or      := and ('or' and)*
    and     := not ('and' not)*
    not     := 'not' not | compare
    compare := sum [('<'|'<='|'>'|'>='|'=='|'!='|'in'|'not' 'in') sum]
    sum     := product (('+'|'-') product)*
    product := unary (('*'|'/') unary)*
    unary   := '-' unary | atom
    atom    := number | string | 'true' | 'false' | '[' [literal (',' literal)*] ']'
             | name | '(' or ')'
    """

    def __init__(self, tokens: list[_Tok], names: dict[str, int]) -> None:
        self.tokens = tokens
        self.pos = 0
        self.names = names
        self.depth = 0

    def peek(self) -> _Tok:
        return self.tokens[self.pos]

    def next(self) -> _Tok:
        tok = self.tokens[self.pos]
        if tok.kind != "end":
            self.pos += 1
        return tok

    def at(self, kind: str, *texts: str) -> bool:
        tok = self.tokens[self.pos]
        return tok.kind == kind and tok.text in texts

    def nest(self, tok: _Tok) -> None:
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise _Bad(f"expression nested deeper than {MAX_NESTING} levels (at column {tok.col})")

    def expression(self) -> _Node:
        return self.or_()

    def or_(self) -> _Node:
        parts = [self.and_()]
        while self.at("keyword", "or"):
            self.next()
            parts.append(self.and_())
        return _logic("or", parts) if len(parts) > 1 else parts[0]

    def and_(self) -> _Node:
        parts = [self.not_()]
        while self.at("keyword", "and"):
            self.next()
            parts.append(self.not_())
        return _logic("and", parts) if len(parts) > 1 else parts[0]

    def not_(self) -> _Node:
        if self.at("keyword", "not"):
            tok = self.next()
            self.nest(tok)
            operand = self.not_()
            self.depth -= 1
            if operand.kind != "bool":
                raise _Bad(
                    f"'not' at column {tok.col} needs a condition, not {_a(operand.kind)} ({operand.what})"
                )
            return _negate(operand)
        return self.compare()

    def compare(self) -> _Node:
        left = self.sum()
        tok = self.peek()
        if (tok.kind == "op" and tok.text in _COMPARISONS) or (tok.kind == "keyword" and tok.text == "in"):
            op = self.next().text
        elif tok.kind == "keyword" and tok.text == "not" and self.tokens[self.pos + 1].text == "in":
            self.next()
            self.next()
            op = "not in"
        else:
            return left
        right = self.sum()
        after = self.peek()
        if (after.kind == "op" and after.text in _COMPARISONS) or (
            after.kind == "keyword" and after.text == "in"
        ):
            raise _Bad(
                f"comparisons do not chain: {after.text!r} at column {after.col} (join them with 'and')"
            )
        if op in ("in", "not in"):
            return _membership(left, right, op == "not in", tok.col)
        return _comparison(left, op, right, tok.col)

    def sum(self) -> _Node:
        first = self.product()
        rest: list[tuple[str, _Node, int]] = []
        while self.at("op", "+", "-"):
            tok = self.next()
            rest.append((tok.text, self.product(), tok.col))
        return _arithmetic(first, rest) if rest else first

    def product(self) -> _Node:
        first = self.unary()
        rest: list[tuple[str, _Node, int]] = []
        while self.at("op", "*", "/"):
            tok = self.next()
            rest.append((tok.text, self.unary(), tok.col))
        return _arithmetic(first, rest) if rest else first

    def unary(self) -> _Node:
        if self.at("op", "-"):
            tok = self.next()
            self.nest(tok)
            operand = self.unary()
            self.depth -= 1
            if operand.kind != "number":
                raise _Bad(
                    f"unary '-' at column {tok.col} needs a number, not {_a(operand.kind)} ({operand.what})"
                )
            if operand.const is not _NO_CONST:
                value = -operand.const
                return _constant("number", value, _number_text(value))
            f = operand.fn
            return _Node("number", lambda t, v: -f(t, v), f"-{operand.what}")
        return self.atom()

    def atom(self) -> _Node:
        tok = self.next()
        if tok.kind == "number":
            return _constant("number", float(tok.text), tok.text)
        if tok.kind == "string":
            return _constant("string", tok.text[1:-1], tok.text)
        if tok.kind == "keyword" and tok.text in ("true", "false"):
            return _constant("bool", tok.text == "true", tok.text)
        if tok.kind == "name":
            return self.identifier(tok)
        if tok.kind == "op" and tok.text == "(":
            self.nest(tok)
            inner = self.or_()
            self.depth -= 1
            close = self.next()
            if close.text != ")" or close.kind != "op":
                raise _Bad(f"expected ')' to close '(' at column {tok.col}, found {close.show()}")
            return inner
        if tok.kind == "op" and tok.text == "[":
            return self.list_(tok)
        if tok.kind == "end":
            raise _Bad("the expression ends too early")
        raise _Bad(f"expected a value at column {tok.col}, found {tok.show()}")

    def list_(self, open_tok: _Tok) -> _Node:
        self.nest(open_tok)
        items: list[_Node] = []
        if not self.at("op", "]"):
            while True:
                start = self.peek()
                item = self.unary()
                if item.const is _NO_CONST or item.kind == "list":
                    raise _Bad(f"a list holds literals only: {start.show()} at column {start.col}")
                items.append(item)
                if self.at("op", ","):
                    self.next()
                    continue
                break
        close = self.next()
        if close.text != "]" or close.kind != "op":
            raise _Bad(
                f"expected ',' or ']' in the list opened at column {open_tok.col}, found {close.show()}"
            )
        self.depth -= 1
        kinds = {item.kind for item in items}
        if len(kinds) > 1:
            raise _Bad(
                f"the list at column {open_tok.col} mixes {' and '.join(sorted(_PLURAL[k] for k in kinds))}"
            )
        elem: Kind | None = items[0].kind if items else None
        values = frozenset(item.const for item in items)
        what = "[" + ", ".join(item.what for item in items) + "]"
        return _Node("list", lambda t, v: values, what, const=values, elem=elem, items=values)

    def identifier(self, tok: _Tok) -> _Node:
        name = tok.text
        if name in TXN_NUMBERS:
            return _txn_number(name)
        if name in TXN_STRINGS:
            return _txn_string(name)
        if name in self.names:
            i = self.names[name]
            return _Node("number", lambda t, v: v[i], repr(name), field="feature", index=i)
        known = [*TXN_NUMBERS, *TXN_STRINGS, *self.names]
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise _Bad(f"unknown name {name!r}{hint}")


def _number_text(value: float) -> str:
    return str(int(value)) if value.is_integer() and abs(value) < 1e16 else repr(value)


def _txn_number(name: str) -> _Node:
    if name == "amount":
        return _Node("number", lambda t, v: t.amount, repr(name), field="txn")
    if name == "lat":

        def lat(t: Transaction, v: Sequence[float]) -> float:
            x = t.lat
            return NAN if x is None else x

        return _Node("number", lat, repr(name), field="txn")

    def lon(t: Transaction, v: Sequence[float]) -> float:
        x = t.lon
        return NAN if x is None else x

    return _Node("number", lon, repr(name), field="txn")


def _txn_string(name: str) -> _Node:
    getters: dict[str, Fn] = {
        "currency": lambda t, v: t.currency,
        "mcc": lambda t, v: t.mcc,
        "country": lambda t, v: t.country,
        "channel": lambda t, v: t.channel,
        "merchant_id": lambda t, v: t.merchant_id,
        "card_id": lambda t, v: t.card_id,
        "device_id": lambda t, v: t.device_id,
        "ip": lambda t, v: t.ip,
    }
    return _Node("string", getters[name], repr(name), field="txn")


def _evaluated(node: _Node) -> _Node:
    """A node whose operands were all constants, replaced by its value."""
    value = node.fn(None, ())  # type: ignore[arg-type]  # constants read neither argument
    text = _number_text(value) if node.kind == "number" else repr(value)
    return _constant(node.kind, value, text)


def _arithmetic(first: _Node, rest: list[tuple[str, _Node, int]]) -> _Node:
    """A left-to-right chain of `+ -` or `* /`, evaluated in a loop (no recursion per operator).
    A division by zero gives NaN, which makes any comparison it reaches false."""
    for op, node, col in rest:
        if node.kind != "number" or first.kind != "number":
            bad = first if first.kind != "number" else node
            raise _Bad(f"'{op}' at column {col} needs numbers, not {_a(bad.kind)} ({bad.what})")
    head = first.fn
    steps = tuple((op, node.fn) for op, node, _ in rest)
    what = first.what + "".join(f" {op} {node.what}" for op, node, _ in rest)

    if len(steps) == 1:
        op, g = steps[0]
        if op == "+":
            fn: Fn = lambda t, v: head(t, v) + g(t, v)  # noqa: E731
        elif op == "-":
            fn = lambda t, v: head(t, v) - g(t, v)  # noqa: E731
        elif op == "*":
            fn = lambda t, v: head(t, v) * g(t, v)  # noqa: E731
        else:

            def fn(t: Transaction, v: Sequence[float]) -> float:
                d = g(t, v)
                return NAN if d == 0 else head(t, v) / d

    else:

        def fn(t: Transaction, v: Sequence[float]) -> float:
            x = head(t, v)
            for op, g in steps:
                y = g(t, v)
                if op == "+":
                    x = x + y
                elif op == "-":
                    x = x - y
                elif op == "*":
                    x = x * y
                else:
                    x = NAN if y == 0 else x / y
            return x

    node = _Node("number", fn, what)
    if first.const is not _NO_CONST and all(n.const is not _NO_CONST for _, n, _ in rest):
        return _evaluated(node)
    return node


def _logic(op: str, parts: list[_Node]) -> _Node:
    for part in parts:
        if part.kind != "bool":
            raise _Bad(f"'{op}' joins conditions, not {_a(part.kind)} ({part.what})")
    fns = tuple(p.fn for p in parts)
    what = f" {op} ".join(p.what for p in parts)
    if op == "and":
        if len(fns) == 2:
            a, b = fns
            fn: Fn = lambda t, v: a(t, v) and b(t, v)  # noqa: E731
        else:
            fn = lambda t, v: all(f(t, v) for f in fns)  # noqa: E731
    elif len(fns) == 2:
        a, b = fns
        fn = lambda t, v: a(t, v) or b(t, v)  # noqa: E731
    else:
        fn = lambda t, v: any(f(t, v) for f in fns)  # noqa: E731
    node = _Node("bool", fn, what)
    return _evaluated(node) if all(p.const is not _NO_CONST for p in parts) else node


def _negate(operand: _Node) -> _Node:
    f = operand.fn
    node = _Node("bool", lambda t, v: not f(t, v), f"not {operand.what}")
    return _evaluated(node) if operand.const is not _NO_CONST else node


def _comparison(left: _Node, op: str, right: _Node, col: int) -> _Node:
    kinds = (left.kind, right.kind)
    if "list" in kinds:
        raise _Bad(f"'{op}' at column {col} cannot compare a list (use 'in')")
    if left.kind != right.kind:
        hint = ""
        string = left if left.kind == "string" else right if right.kind == "string" else None
        number = left if left.kind == "number" else right if right.kind == "number" else None
        if string is not None and number is not None and number.const is not _NO_CONST:
            hint = f' (write the number in quotes: "{number.what}")'
        elif number is not None and (left if left.kind == "bool" else right).const is not _NO_CONST:
            hint = " (flags are numbers: compare them with 1 or 0)"
        raise _Bad(
            f"'{op}' at column {col} compares {_a(left.kind)} ({left.what}) with {_a(right.kind)} ({right.what}){hint}"
        )
    if left.kind in ("string", "bool") and op not in ("==", "!="):
        raise _Bad(f"'{op}' at column {col} orders numbers only; {_a(left.kind)} takes '==' or '!='")
    what = f"{left.what} {op} {right.what}"
    if left.kind == "bool":
        fn = _compare_plain(left.fn, op, right.fn)
    elif left.kind == "string":
        fn = _compare_strings(left, op, right)
    else:
        fn = _compare_numbers(left, op, right)
    node = _Node("bool", fn, what)
    if left.const is not _NO_CONST and right.const is not _NO_CONST:
        return _evaluated(node)
    return node


def _compare_plain(f: Fn, op: str, g: Fn) -> Fn:
    if op == "==":
        return lambda t, v: f(t, v) == g(t, v)
    return lambda t, v: f(t, v) != g(t, v)


def _compare_strings(left: _Node, op: str, right: _Node) -> Fn:
    """`==`/`!=` on strings; a missing (None) side makes either false."""
    if right.const is not _NO_CONST or left.const is not _NO_CONST:
        c = right.const if right.const is not _NO_CONST else left.const
        h = left.fn if right.const is not _NO_CONST else right.fn
        if op == "==":
            return lambda t, v: h(t, v) == c
        return lambda t, v: (x := h(t, v)) is not None and x != c
    f, g = left.fn, right.fn
    if op == "==":
        return lambda t, v: (x := f(t, v)) is not None and x == g(t, v)

    def differ(t: Transaction, v: Sequence[float]) -> bool:
        x = f(t, v)
        y = g(t, v)
        return x is not None and y is not None and x != y

    return differ


_FLIPPED = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "==": "==", "!=": "!="}


def _compare_numbers(left: _Node, op: str, right: _Node) -> Fn:
    """A numeric comparison; NaN on either side makes it false (`<`..`==` are by IEEE already;
    `!=` checks). The common `feature OP constant` is one closure with no call inside."""
    if left.const is not _NO_CONST and right.const is _NO_CONST:
        left, right, op = right, left, _FLIPPED[op]
    if right.const is not _NO_CONST:
        c = float(right.const)
        if left.field == "feature":
            i = left.index
            if op == "<":
                return lambda t, v: v[i] < c
            if op == "<=":
                return lambda t, v: v[i] <= c
            if op == ">":
                return lambda t, v: v[i] > c
            if op == ">=":
                return lambda t, v: v[i] >= c
            if op == "==":
                return lambda t, v: v[i] == c
            return lambda t, v: (x := v[i]) == x and x != c and c == c
        h = left.fn
        if op == "<":
            return lambda t, v: h(t, v) < c
        if op == "<=":
            return lambda t, v: h(t, v) <= c
        if op == ">":
            return lambda t, v: h(t, v) > c
        if op == ">=":
            return lambda t, v: h(t, v) >= c
        if op == "==":
            return lambda t, v: h(t, v) == c
        return lambda t, v: (x := h(t, v)) == x and x != c and c == c
    f, g = left.fn, right.fn
    if op == "<":
        return lambda t, v: f(t, v) < g(t, v)
    if op == "<=":
        return lambda t, v: f(t, v) <= g(t, v)
    if op == ">":
        return lambda t, v: f(t, v) > g(t, v)
    if op == ">=":
        return lambda t, v: f(t, v) >= g(t, v)
    if op == "==":
        return lambda t, v: f(t, v) == g(t, v)

    def differ(t: Transaction, v: Sequence[float]) -> bool:
        x = f(t, v)
        y = g(t, v)
        return x == x and y == y and x != y

    return differ


def _membership(left: _Node, right: _Node, negated: bool, col: int) -> _Node:
    op = "not in" if negated else "in"
    if right.kind != "list":
        raise _Bad(
            f"'{op}' at column {col} needs a list on its right ([...]), not {_a(right.kind)} ({right.what})"
        )
    if left.kind == "list":
        raise _Bad(f"'{op}' at column {col} needs a value on its left, not a list")
    if right.elem is not None and right.elem != left.kind:
        raise _Bad(
            f"'{op}' at column {col} looks for {_a(left.kind)} ({left.what}) in a list of {_PLURAL[right.elem]} ({right.what})"
        )
    items = right.items
    f = left.fn
    if left.kind == "number":
        if negated:
            fn: Fn = lambda t, v: (x := f(t, v)) == x and x not in items  # noqa: E731
        else:
            fn = lambda t, v: f(t, v) in items  # noqa: E731  # NaN is in no set of literals
    elif left.kind == "string":
        if negated:
            fn = lambda t, v: (x := f(t, v)) is not None and x not in items  # noqa: E731
        else:
            fn = lambda t, v: f(t, v) in items  # noqa: E731  # None is in no list of strings
    elif negated:
        fn = lambda t, v: f(t, v) not in items  # noqa: E731
    else:
        fn = lambda t, v: f(t, v) in items  # noqa: E731
    node = _Node("bool", fn, f"{left.what} {op} {right.what}")
    return _evaluated(node) if left.const is not _NO_CONST else node
