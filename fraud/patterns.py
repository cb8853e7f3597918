"""Fraud patterns: how each one adds fraudulent transactions to a synthetic world, or turns
legit ones into fraud, and how the fraud budget is shared among them (`fraud_transactions`)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from fraud.synthetic import CITIES, DAY_MS, HOUR_MS, MINUTE_MS, SyntheticWorld, Txn, haversine_km

BASE_PATTERNS = (
    "card_testing",
    "account_takeover",
    "compromised_merchant",
    "inflated_spending",
    "impossible_travel",
)
DRIFT_PATTERNS = ("merchant_cashout",)
# Patterns that occur only when `mix` names them.
EXTRA_PATTERNS = (
    "compromised_terminal",
    "compromised_card",
    "large_amount",
)
MIX_PATTERNS = (*BASE_PATTERNS, *EXTRA_PATTERNS)  # what `mix` may name, in generation order

# Expected fraud transactions per incident, used to turn a txn budget into incident counts.
BASE_SHARES = {
    "card_testing": (0.22, 13.0),
    "account_takeover": (0.20, 4.5),
    "compromised_merchant": (0.20, 0.0),  # budgeted in transactions directly
    "inflated_spending": (0.20, 5.5),
    "impossible_travel": (0.18, 1.0),
}
# Expected fraud transactions per incident of the extra patterns (0: budgeted in transactions).
EXTRA_SIZES = {"compromised_terminal": 0.0, "compromised_card": 0.0, "large_amount": 1.0}
DRIFT_SHARE_OF_POST = 0.4  # target share of the drift pattern among post-drift fraud
DRIFT_SIZE = 4.5


def _card_testing(w: SyntheticWorld, n: int) -> Iterator[Txn]:
    """Bursts of tiny amounts at many online merchants, sometimes cashed in with one big buy."""
    for _ in range(n):
        card, dev, t = int(w.rng.integers(w.cfg.n_cards)), w.new_device(), w.random_time()
        k = min(int(w.rng.integers(5, 21)), len(w.testing_pool))
        for m in w.rng.choice(w.testing_pool, size=k, replace=False).tolist():
            t += int(w.rng.integers(2_000, 20_000))
            yield t, card, m, float(w.rng.uniform(0.5, 5.0)), True, dev, "card_testing"
        if w.rng.random() < 0.5:
            t += int(w.rng.integers(5, 60)) * MINUTE_MS
            m = int(w.rng.choice(w.big_online_pool))
            yield t, card, m, w.amount(card, 5, 12), True, dev, "card_testing"


def _account_takeover(w: SyntheticWorld, n: int) -> Iterator[Txn]:
    """A never-seen device and ip, a normal-looking first buy, then several large ones."""
    for _ in range(n):
        card, dev, t = int(w.rng.integers(w.cfg.n_cards)), w.new_device(), w.random_time()
        m = int(w.rng.choice(w.big_online_pool))
        yield t, card, m, w.amount(card, 0.5, 1.5), True, dev, "account_takeover"
        k = int(w.rng.integers(2, 6))
        for dt in np.sort(w.rng.integers(10 * MINUTE_MS, 6 * HOUR_MS, size=k)).tolist():
            m = int(w.rng.choice(w.big_online_pool))
            yield t + dt, card, m, w.amount(card, 3, 8), True, dev, "account_takeover"


def _compromised_merchant(w: SyntheticWorld, budget: int, legit: np.ndarray) -> Iterator[Txn]:
    """Skimmed at a breached shop; the stolen cards are used 3-20 days later elsewhere."""
    ts, card_of, merch = legit[:, 0], legit[:, 1], legit[:, 2]
    pos = np.flatnonzero(~w.m_online)
    popular = pos[np.argsort(-w.m_pop[pos], kind="stable")][: max(3, len(pos) // 3)]
    made = 0
    for m in w.rng.permutation(popular).tolist():
        if made >= budget:
            return
        w0 = w.start_ms + int(w.rng.integers(0, max(1, w.cfg.days - 5))) * DAY_MS
        w1 = w0 + int(w.rng.integers(5, 11)) * DAY_MS
        sel = (merch == m) & (ts >= w0) & (ts < w1)
        cards, first = np.unique(card_of[sel], return_index=True)
        visit = ts[sel][first]
        for i in w.rng.permutation(len(cards)).tolist():
            if made >= budget or w.rng.random() > 0.45:
                continue
            card = int(cards[i])
            online = bool(w.rng.random() < 0.5)
            dev = w.new_device() if online else -1
            t = int(visit[i]) + int(w.rng.uniform(3, 20) * DAY_MS)
            for _ in range(int(w.rng.integers(1, 4))):
                if t >= w.end_ms:  # not yet happened within the period: don't count it
                    break
                if online:
                    shop = int(w.rng.choice(w.big_online_pool))
                else:
                    shop = w.pos_merchant(int(w.c_home[card]), exclude=m)
                yield t, card, shop, w.amount(card, 1.5, 4), online, dev, "compromised_merchant"
                made += 1
                t += int(w.rng.integers(30 * MINUTE_MS, 36 * HOUR_MS))


def _inflated_spending(w: SyntheticWorld, n: int) -> Iterator[Txn]:
    """A cloned card spends 4-10x its usual mean in home-city shops over a day or two."""
    for _ in range(n):
        card, t = int(w.rng.integers(w.cfg.n_cards)), w.random_time(tail_days=2)
        k = int(w.rng.integers(3, 9))
        span = int(w.rng.uniform(1, 2) * DAY_MS)
        for dt in [0, *np.sort(w.rng.integers(0, span, size=k - 1)).tolist()]:
            m = w.pos_merchant(int(w.c_home[card]))
            yield t + dt, card, m, w.amount(card, 4, 10), False, -1, "inflated_spending"


def _impossible_travel(w: SyntheticWorld, n: int, legit: np.ndarray) -> Iterator[Txn]:
    """A card-present buy > 1000 km away from the card's previous card-present buy, < 2 h later."""
    pos_rows = np.flatnonzero((legit[:, 3] == 0) & (legit[:, 0] < w.end_ms - 2 * HOUR_MS))
    far = {
        a: [b for b in range(len(CITIES)) if haversine_km(CITIES[a][3:5], CITIES[b][3:5]) > 1000]
        for a in range(len(CITIES))
    }
    for row in w.rng.choice(pos_rows, size=min(n, len(pos_rows)), replace=False).tolist():
        t, card, m = (int(x) for x in legit[row, :3])
        city = int(w.rng.choice(far[int(w.m_city[m])]))
        t += int(w.rng.integers(10, 110)) * MINUTE_MS
        yield t, card, w.pos_merchant(city), w.amount(card, 1, 3), False, -1, "impossible_travel"


def _merchant_cashout(w: SyntheticWorld, n: int, first_day: int) -> Iterator[Txn]:
    """Drift: ordinary amounts at a few rarely-used cash-like merchants, from the card's own
    devices, several per card over a few days. None of the base patterns' signatures apply."""
    for _ in range(n):
        card, t = int(w.rng.integers(w.cfg.n_cards)), w.random_time(first_day)
        k = int(w.rng.integers(3, 7))
        span = int(w.rng.uniform(1, 4) * DAY_MS)
        for dt in [0, *np.sort(w.rng.integers(0, span, size=k - 1)).tolist()]:
            m = int(w.rng.choice(w.cashout))
            dev = w.usual_device(card)
            yield t + dt, card, m, w.amount(card, 1, 2), True, dev, w.cfg.drift_pattern


def _compromised_terminal(
    w: SyntheticWorld, budget: int, legit: np.ndarray, taken: dict[int, tuple[str, float]]
) -> None:
    """A busy merchant's terminal or checkout is compromised for weeks: each transaction made
    there in that window is fraud with an incident-wide probability. Existing transactions are
    relabelled (nothing else changes), so only the merchant's recent fraud rate gives it away.
    Whole incidents are added until the budget is reached (the last one may overshoot it)."""
    ts, merch = legit[:, 0], legit[:, 2]
    visits = np.bincount(merch, minlength=w.cfg.n_merchants)
    busy = np.argsort(-visits, kind="stable")[: max(1, w.cfg.n_merchants // 2)]
    made = 0
    for m in w.rng.permutation(busy[visits[busy] > 0]).tolist():
        if made >= budget:
            return
        length = int(w.rng.integers(14, 36))
        w0 = w.start_ms + int(w.rng.integers(0, max(1, w.cfg.days - length + 1))) * DAY_MS
        p = float(w.rng.uniform(0.3, 0.7))
        rows = np.flatnonzero((merch == m) & (ts >= w0) & (ts < w0 + length * DAY_MS))
        for row in rows[w.rng.random(len(rows)) < p].tolist():
            if row not in taken:
                taken[row] = ("compromised_terminal", 1.0)
                made += 1


def _compromised_card(
    w: SyntheticWorld, budget: int, legit: np.ndarray, taken: dict[int, tuple[str, float]]
) -> None:
    """A card's details are used for a few days alongside its owner: about a third of the card's
    own transactions in the window are fraud, with amounts inflated 3-6x (existing transactions
    are relabelled and inflated). Each card is compromised at most once; one with no transactions
    in its window is passed over."""
    ts, card_of = legit[:, 0], legit[:, 1]
    made = 0
    for card in w.rng.permutation(w.cfg.n_cards).tolist():
        if made >= budget:
            return
        length = int(w.rng.integers(3, 15))
        w0 = w.start_ms + int(w.rng.integers(0, max(1, w.cfg.days - length + 1))) * DAY_MS
        rows = np.flatnonzero((card_of == card) & (ts >= w0) & (ts < w0 + length * DAY_MS))
        if not len(rows):
            continue
        hit, factor = w.rng.random(len(rows)) < 1 / 3, w.rng.uniform(3, 6, len(rows))
        for row, f in zip(rows[hit].tolist(), factor[hit].tolist(), strict=True):
            if row not in taken:
                taken[row] = ("compromised_card", f)
                made += 1


def _large_amount(w: SyntheticWorld, n: int) -> Iterator[Txn]:
    """One large buy on a card at an ordinary time and place (home-city shop, or online from the
    card's usual device): only the amount is out of line."""
    for _ in range(n):
        card, t = int(w.rng.integers(w.cfg.n_cards)), w.random_time()
        amount = max(300.0, w.amount(card, 8, 20))
        if w.rng.random() < 0.5:
            m, dev = int(w.rng.choice(w.big_online_pool)), w.usual_device(card)
            yield t, card, m, amount, True, dev, "large_amount"
        else:
            yield t, card, w.pos_merchant(int(w.c_home[card])), amount, False, -1, "large_amount"


def fraud_transactions(
    w: SyntheticWorld, n_legit: int, legit: np.ndarray
) -> tuple[list[Txn], dict[int, tuple[str, float]]]:
    """All fraud, sized so that the overall fraud share lands near `fraud_rate_target`: the new
    transactions, and the legit rows to relabel as fraud (row -> (pattern, amount factor))."""
    cfg = w.cfg
    total = cfg.fraud_rate_target * n_legit / (1 - cfg.fraud_rate_target)
    post = (cfg.days - cfg.drift_day) / cfg.days if cfg.drift_on and cfg.drift_day else 0.0
    ratio = DRIFT_SHARE_OF_POST / (1 - DRIFT_SHARE_OF_POST)
    base = total / (1 + ratio * post)
    shares = cfg.mix_weights()

    def count(p: str) -> int:
        size = BASE_SHARES[p][1] if p in BASE_SHARES else EXTRA_SIZES[p]
        return max(1, round(shares[p] * base / size)) if size else max(1, round(shares[p] * base))

    out: list[Txn] = []
    relabel: dict[int, tuple[str, float]] = {}
    for p in shares:
        if p == "card_testing":
            out += _card_testing(w, count(p))
        elif p == "account_takeover":
            out += _account_takeover(w, count(p))
        elif p == "compromised_merchant":
            out += _compromised_merchant(w, count(p), legit)
        elif p == "inflated_spending":
            out += _inflated_spending(w, count(p))
        elif p == "impossible_travel":
            out += _impossible_travel(w, count(p), legit)
        elif p == "compromised_terminal":
            _compromised_terminal(w, count(p), legit, relabel)
        elif p == "compromised_card":
            _compromised_card(w, count(p), legit, relabel)
        elif p == "large_amount":
            out += _large_amount(w, count(p))
    if cfg.drift_on and cfg.drift_day is not None:
        out += _merchant_cashout(w, max(1, round(ratio * base * post / DRIFT_SIZE)), cfg.drift_day)
    return [t for t in out if w.start_ms <= t[0] < w.end_ms], relabel
