"""Shared scoring-contract checks for every model, plus XGBoost, River and combine() specifics."""

from __future__ import annotations

import json
import math
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import xgboost as xgb
from hypothesis import given
from hypothesis import strategies as st

from models.combine import combine
from models.evaluation import roc_auc
from models.online import OnlineModel, x_dict
from models.xgb import NUM_BOOST_ROUND, XGBScorer, train_xgb

NAMES = [f"f{i}" for i in range(6)]  # f0 carries the signal, the others are noise


def make_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Separable-ish problem: fraud iff f0 is large (plus a little label noise), ~7% positives."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, len(NAMES)))
    y = (X[:, 0] + 0.2 * rng.normal(size=n) > 1.5).astype(np.int8)
    X[:, 1:][rng.random((n, len(NAMES) - 1)) < 0.05] = np.nan  # noise features sometimes missing
    return X, y


@pytest.fixture(scope="module")
def data() -> dict[str, Any]:
    X_train, y_train = make_data(3000, seed=1)
    X_eval, y_eval = make_data(1000, seed=2)
    X_test, y_test = make_data(2000, seed=3)
    return {"train": (X_train, y_train), "eval": (X_eval, y_eval), "test": (X_test, y_test)}


@pytest.fixture(scope="module")
def booster(data: dict[str, Any]) -> xgb.Booster:
    X, y = data["train"]
    return train_xgb(X, y, NAMES, nthread=2, seed=0, eval_set=data["eval"])


@pytest.fixture(scope="module")
def online_trained(data: dict[str, Any]) -> OnlineModel:
    model = OnlineModel(lr=0.05, warmup=50, pos_weight=5.0)
    X, y = data["train"]
    for row, label in zip(X, y, strict=True):
        model.learn_one(x_dict(NAMES, row), bool(label))
    return model


# --- the scoring contract, parametrised over every model ------------------------------------


@dataclass
class Contract:
    """Adapter: batch scoring, a fingerprint of the model state, and a pickle round trip."""

    name: str
    score: Callable[[np.ndarray], np.ndarray]
    state: Callable[[], bytes]
    roundtrip: Callable[[], Callable[[np.ndarray], np.ndarray]]


def xgb_contract(booster: xgb.Booster) -> Contract:
    scorer = XGBScorer(booster, NAMES, nthread=1)

    def state() -> bytes:
        return bytes(scorer.booster.save_raw("ubj")) + scorer.booster.save_config().encode()

    def roundtrip() -> Callable[[np.ndarray], np.ndarray]:
        return pickle.loads(pickle.dumps(scorer)).score

    return Contract("xgb", scorer.score, state, roundtrip)


def online_contract(model: OnlineModel) -> Contract:
    def score_with(m: OnlineModel) -> Callable[[np.ndarray], np.ndarray]:
        return lambda X: np.array([m.predict_proba_one(x_dict(NAMES, row)) for row in X])

    def roundtrip() -> Callable[[np.ndarray], np.ndarray]:
        return score_with(pickle.loads(pickle.dumps(model)))

    return Contract("online", score_with(model), lambda: pickle.dumps(model), roundtrip)


@pytest.fixture(params=["xgb", "online"])
def contract(request: pytest.FixtureRequest) -> Contract:
    if request.param == "xgb":
        return xgb_contract(request.getfixturevalue("booster"))
    return online_contract(request.getfixturevalue("online_trained"))


def test_contract_probabilities_in_unit_interval(contract: Contract, data: dict[str, Any]) -> None:
    X, _ = data["test"]
    p = contract.score(X)
    assert p.shape == (len(X),)
    assert np.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()
    assert p.std() > 0, f"{contract.name} scores are constant"


def test_contract_predict_has_no_side_effects(contract: Contract, data: dict[str, Any]) -> None:
    X, _ = data["test"]
    before = contract.state()
    first = contract.score(X)
    second = contract.score(X)
    np.testing.assert_array_equal(first, second)
    assert contract.state() == before, f"scoring changed the {contract.name} model"


def test_contract_pickle_round_trip(contract: Contract, data: dict[str, Any]) -> None:
    X, _ = data["test"]
    np.testing.assert_array_equal(contract.roundtrip()(X), contract.score(X))


def test_contract_tolerates_missing_features(contract: Contract, data: dict[str, Any]) -> None:
    X = data["test"][0][:50].copy()
    X[::2, 0] = np.nan
    X[-1, :] = np.nan  # nothing known at all
    p = contract.score(X)
    assert np.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()


# --- XGBoost ----------------------------------------------------------------------------------


def test_xgb_learns_separable_problem(booster: xgb.Booster, data: dict[str, Any]) -> None:
    X, y = data["test"]
    assert roc_auc(y, XGBScorer(booster, NAMES).score(X)) > 0.9
    assert booster.feature_names == NAMES


def test_xgb_early_stopping_keeps_exactly_the_best_rounds(booster: xgb.Booster, data: dict[str, Any]) -> None:
    X_eval, y_eval = data["eval"]
    deval = xgb.DMatrix(X_eval, label=y_eval, feature_names=NAMES)
    rounds = booster.num_boosted_rounds()
    assert rounds < NUM_BOOST_ROUND
    aucpr = [float(booster[:k].eval(deval).rsplit(":", 1)[1]) for k in range(1, rounds + 1)]
    assert int(np.argmax(aucpr)) == rounds - 1  # no trailing rounds past the best one


def test_xgb_training_is_deterministic_and_params_override(data: dict[str, Any]) -> None:
    X, y = data["train"]
    a = train_xgb(X, y, NAMES, seed=7, params={"num_boost_round": 7})
    b = train_xgb(X, y, NAMES, seed=7, params={"num_boost_round": 7})
    assert a.num_boosted_rounds() == 7
    np.testing.assert_array_equal(a.inplace_predict(X), b.inplace_predict(X))


def test_xgb_top_contribution_is_the_informative_feature(booster: xgb.Booster, data: dict[str, Any]) -> None:
    X, _ = data["test"]
    scorer = XGBScorer(booster, NAMES)
    top_rows = X[np.argsort(-scorer.score(X))[:30]]
    scores, reasons = scorer.score_with_reasons(top_rows, top_k=3)
    assert scores.shape == (30,) and len(reasons) == 30
    for row, row_reasons in zip(top_rows, reasons, strict=True):
        assert 1 <= len(row_reasons) <= 3
        assert row_reasons[0][0] == "f0"
        contribs = [c for _, _, c in row_reasons]
        assert contribs == sorted(contribs, reverse=True) and min(contribs) > 0
        for name, value, _ in row_reasons:
            expected = float(np.float32(row[NAMES.index(name)]))
            assert value == expected or (math.isnan(value) and math.isnan(expected))
    assert scorer.contributions(top_rows[:2], top_k=0) == [[], []]


def test_xgb_one_call_per_batch(
    booster: xgb.Booster, data: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    scorer = XGBScorer(booster, NAMES)
    calls: list[tuple[str, tuple[int, ...]]] = []
    real_inplace, real_predict = scorer.booster.inplace_predict, scorer.booster.predict

    def inplace(X: np.ndarray, **kw: Any) -> np.ndarray:
        assert X.dtype == np.float32 and X.flags.c_contiguous
        calls.append(("inplace", X.shape))
        return real_inplace(X, **kw)

    def predict(d: xgb.DMatrix, **kw: Any) -> np.ndarray:
        calls.append(("contribs", (d.num_row(), d.num_col())))
        return real_predict(d, **kw)

    monkeypatch.setattr(scorer.booster, "inplace_predict", inplace)
    monkeypatch.setattr(scorer.booster, "predict", predict)
    X = data["test"][0][:256]
    scores, reasons = scorer.score_with_reasons(X, top_k=2)
    assert calls == [("inplace", (256, 6)), ("contribs", (256, 6))]
    assert scores.shape == (256,) and scores.dtype == np.float64 and len(reasons) == 256

    calls.clear()  # reasons only for alerting rows: still one call each, on the subset
    threshold = float(np.sort(scores)[-5])
    _, few = scorer.score_with_reasons(X, top_k=2, min_score=threshold)
    assert calls == [("inplace", (256, 6)), ("contribs", (5, 6))]
    assert [bool(r) for r in few] == (scores >= threshold).tolist()
    assert repr([r for r in few if r]) == repr([reasons[i] for i in np.flatnonzero(scores >= threshold)])
    calls.clear()
    assert scorer.score_with_reasons(X, top_k=2, min_score=2.0)[1] == [[]] * 256
    assert calls == [("inplace", (256, 6))]


def test_xgb_scorer_pins_threads_without_touching_callers_booster(booster: xgb.Booster) -> None:
    def nthread(b: xgb.Booster) -> str:
        return json.loads(b.save_config())["learner"]["generic_param"]["nthread"]

    original = nthread(booster)
    scorer = XGBScorer(booster, NAMES, nthread=2)
    assert nthread(scorer.booster) == "2"
    assert nthread(pickle.loads(pickle.dumps(scorer)).booster) == "2"
    assert nthread(booster) == original


def test_xgb_scorer_rejects_wrong_schema(booster: xgb.Booster) -> None:
    with pytest.raises(ValueError, match="feature names"):
        XGBScorer(booster, [*NAMES[1:], "f0"])
    scorer = XGBScorer(booster, NAMES)
    with pytest.raises(ValueError, match="matrix"):
        scorer.score(np.zeros((3, 5)))
    assert scorer.score(np.zeros((0, 6))).shape == (0,)


# --- River online model -----------------------------------------------------------------------


def test_online_untrained_and_warmup_give_zero() -> None:
    model = OnlineModel(warmup=3)
    x = {"a": 1.0}
    assert model.predict_proba_one(x) == 0.0
    for _ in range(5):
        model.learn_one(x, False)
    assert model.predict_proba_one(x) == 0.0  # warm-up reached but no positive yet
    model.learn_one({"a": 3.0}, True)
    assert (model.n_learned, model.n_positive) == (6, 1)
    p = model.predict_proba_one(x)
    assert 0.0 < p < 1.0 and p != 0.5


def test_online_improves_auc_on_a_stream(data: dict[str, Any]) -> None:
    X_test, y_test = data["test"]
    model = OnlineModel(lr=0.05, warmup=50, pos_weight=5.0)

    def auc() -> float:
        s = [model.predict_proba_one(x_dict(NAMES, row)) for row in X_test]
        return roc_auc(y_test, s)

    assert auc() == 0.5  # everything scores 0.0 before learning
    X, y = data["train"]
    for row, label in zip(X, y, strict=True):
        model.learn_one(x_dict(NAMES, row), bool(label))
    assert auc() > 0.9


def test_online_pos_weight_raises_positive_scores(data: dict[str, Any]) -> None:
    X, y = data["train"]
    plain, weighted = OnlineModel(pos_weight=1.0, warmup=1), OnlineModel(pos_weight=10.0, warmup=1)
    for row, label in zip(X[:1500], y[:1500], strict=True):
        plain.learn_one(x_dict(NAMES, row), bool(label))
        weighted.learn_one(x_dict(NAMES, row), bool(label))
    positives = [x_dict(NAMES, row) for row, label in zip(X, y, strict=True) if label]
    mean_plain = np.mean([plain.predict_proba_one(x) for x in positives])
    mean_weighted = np.mean([weighted.predict_proba_one(x) for x in positives])
    assert mean_weighted > mean_plain + 0.1


def test_online_drops_nan_and_keeps_learning_identically_after_pickle() -> None:
    model = OnlineModel(warmup=1)
    model.learn_one({"a": 1.0, "b": float("nan")}, True)
    model.learn_one({"a": -1.0, "b": 2.0}, False)
    assert all(math.isfinite(v) for v in model._scaler.means.values())  # noqa: SLF001
    clone = pickle.loads(pickle.dumps(model))
    for m in (model, clone):
        m.learn_one({"a": 0.5, "b": float("inf")}, True)
    x = {"a": 0.7, "b": float("nan")}
    assert clone.predict_proba_one(x) == model.predict_proba_one(x)
    assert (clone.n_learned, clone.n_positive) == (3, 2)


def test_online_predict_with_unseen_feature_leaves_state_unchanged(
    online_trained: OnlineModel,
) -> None:
    before = pickle.dumps(online_trained)
    x = {"f0": 2.0, "never_seen": 1.0}
    assert online_trained.predict_proba_one(x) == online_trained.predict_proba_one({"f0": 2.0})
    assert pickle.dumps(online_trained) == before


def _stream(seed: int, n: int) -> list[tuple[dict[str, float], bool]]:
    """Rows of very different scales, a constant feature, features that appear late or are absent."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        x = {
            "big": float(rng.normal(1e9, 1e6)),
            "tiny": float(rng.normal(0.0, 1e-12)),
            "const": 3.0,
            "wide": float(rng.standard_cauchy()),
            "int_like": float(rng.integers(0, 5)),
        }
        if i > n // 3:
            x["late"] = float(rng.normal(-5.0, 2.0))
        if rng.random() < 0.2:
            del x["wide"]
        rows.append((x, bool(rng.random() < 0.1)))
    return rows


def _state(model: OnlineModel) -> list[Any]:
    """Everything the model holds, floats as their exact bits, dict orders included."""
    scaler, clf = model._scaler, model._classifier  # noqa: SLF001
    as_hex = lambda d: [(k, float(v).hex()) for k, v in d.items()]  # noqa: E731
    return [
        list(scaler.counts.items()), as_hex(scaler.means), as_hex(scaler.vars),
        as_hex(clf._weights), float(clf.intercept).hex(), model.n_learned, model.n_positive,  # noqa: SLF001
    ]  # fmt: skip


def _alike_both_ways(run: Callable[[bool], tuple[OnlineModel, list[float]]]) -> OnlineModel:
    """Run `run(compiled)` with the compiled code and with River's own; the scores it returns, the
    models' state and their pickles must be the same to the bit. Returns the compiled run's model."""
    from models import online

    if online._river is None:  # noqa: SLF001
        pytest.skip("models._river is not built")
    models, scores = {}, {}
    was = online.use_compiled(True)
    try:
        for compiled in (True, False):
            online.use_compiled(compiled)
            model, got = run(compiled)
            models[compiled], scores[compiled] = model, [v.hex() for v in got]
    finally:
        online.use_compiled(was)
    assert scores[True] == scores[False]
    assert _state(models[True]) == _state(models[False])
    assert pickle.dumps(models[True]) == pickle.dumps(models[False])
    assert any(float.fromhex(v) not in (0.0, 1.0) for v in scores[True])  # it learned something
    return models[True]


@pytest.mark.parametrize("seed", [1, 2])
def test_online_compiled_scaler_is_rivers_bit_for_bit(seed: int) -> None:
    """The compiled scaler updates and feature dict give River's floats, keys and key order: the same
    predictions, the same learned state, the same pickles, whichever code ran."""

    def run(compiled: bool) -> tuple[OnlineModel, list[float]]:
        model, got = OnlineModel(warmup=50, pos_weight=4.0), []
        for x, y in _stream(seed, 600):
            got += [model.predict_proba_one(x), model.learn_one(x, y)]
        got.append(model.predict_proba_one({"big": 2e9, "late": 1.0, "never_seen": 1.0}))
        return model, got

    _alike_both_ways(run)


@pytest.mark.parametrize("seed", [5, 6])
def test_online_rows_learned_from_float32_arrays_are_rivers_bit_for_bit(seed: int) -> None:
    """A labelled vector's values come as a float32 `array` (what `pending` kept), which the
    compiled code reads in place: the same model as River's own code learning `x_dict` of the
    same float32 values, NaN and infinity left out."""
    from array import array

    names = ["big", "tiny", "const", "wide", "int_like", "late", "never_learned"]
    rows = [
        (array("f", [x.get(k, float("nan")) for k in names[:-1]] + [float("inf")]), y)
        for x, y in _stream(seed, 500)
    ]

    def run(compiled: bool) -> tuple[OnlineModel, list[float]]:
        model, got = OnlineModel(warmup=40, pos_weight=3.0), []
        for row, y in rows:
            if compiled:
                got += [model.predict_values(names, row.tolist()), model.learn_values(names, row, y)]
            else:
                x = x_dict(names, row.tolist())
                got += [model.predict_proba_one(x), model.learn_one(x, y)]
        return model, got

    model = _alike_both_ways(run)
    assert "never_learned" not in model._scaler.counts  # noqa: SLF001 - inf is left out
    assert model.n_learned == len(rows)


@pytest.mark.parametrize("seed", [3, 4])
def test_online_rows_learned_in_one_pass_are_rivers_bit_for_bit(seed: int) -> None:
    """`learn_values` / `predict_values` (names and a row, as the scorer holds them, NaN for a
    missing value) give what River's own code gives for `x_dict` of the row: the same scores, the
    same model, the same pickle."""
    names = ["big", "tiny", "const", "wide", "int_like", "late", "never_learned"]
    rows = [([x.get(k, float("nan")) for k in names[:-1]] + [float("inf")], y) for x, y in _stream(seed, 500)]

    def run(compiled: bool) -> tuple[OnlineModel, list[float]]:
        model, got = OnlineModel(warmup=40, pos_weight=3.0), []
        for row, y in rows:
            if compiled:
                got += [model.predict_values(names, row), model.learn_values(names, np.asarray(row), y)]
            else:
                x = x_dict(names, row)
                got += [model.predict_proba_one(x), model.learn_one(x, y)]
        return model, got

    model = _alike_both_ways(run)
    assert "never_learned" not in model._scaler.counts  # noqa: SLF001 - inf is left out
    with pytest.raises(ValueError, match=r"^7 names but 1 values$"):
        model.learn_values(names, [1.0], True)  # a row that does not match the names


@pytest.mark.parametrize("seed", [9, 10])
def test_online_row_model_survives_pickles_other_names_and_rivers_code_in_between(seed: int) -> None:
    """The row model (River's state in arrays while rows are learned) hands River's objects back
    exactly: pickled mid-stream, the same features under names in another order, River's own
    dict path for a while: the same scores, model and pickle as River's code all along."""
    names = ["big", "tiny", "const", "wide", "int_like", "late"]
    rows = [([x.get(k, float("nan")) for k in names], y) for x, y in _stream(seed, 700)]

    def run(compiled: bool) -> tuple[OnlineModel, list[float]]:
        model, got = OnlineModel(warmup=30, pos_weight=2.0, lr=0.03), []
        for i, (row, y) in enumerate(rows):
            if i % 250 == 249:
                model = pickle.loads(pickle.dumps(model))
            ns, vs = (names[::-1], row[::-1]) if 300 <= i < 400 else (names, row)
            if compiled and not 450 <= i < 480:
                got += [model.predict_values(ns, vs), model.learn_values(ns, vs, y)]
            else:
                x = x_dict(ns, vs)
                got += [model.predict_proba_one(x), model.learn_one(x, y)]
        return model, got

    _alike_both_ways(run)


@pytest.mark.parametrize("as_array", [False, True])
def test_online_rows_of_a_model_the_row_model_does_not_cover_are_rivers_bit_for_bit(as_array: bool) -> None:
    """With an L2 penalty the row model declines: rows (lists or numpy arrays) take the compiled
    scaler and River's classifier, and give what River's own code gives for `x_dict` of the row."""
    names = ["big", "tiny", "const", "wide", "int_like", "late"]
    rows = [([x.get(k, float("nan")) for k in names], y) for x, y in _stream(11, 400)]

    def run(compiled: bool) -> tuple[OnlineModel, list[float]]:
        model, got = OnlineModel(warmup=30, l2=0.01, pos_weight=2.0), []
        for row, y in rows:
            if compiled:
                vs = np.asarray(row) if as_array else row
                got += [model.predict_values(names, vs), model.learn_values(names, vs, y)]
            else:
                x = x_dict(names, row)
                got += [model.predict_proba_one(x), model.learn_one(x, y)]
        return model, got

    model = _alike_both_ways(run)
    assert model._rows_for(names) is None  # noqa: SLF001 - the row model was not what learned


def test_online_row_model_declines_what_it_cannot_hold() -> None:
    """Names given twice, or River's dicts holding a name the row does not: River's own code."""
    from models import online

    if online._river is None:  # noqa: SLF001
        pytest.skip("models._river is not built")
    model = OnlineModel(warmup=0)
    assert model._rows_for(["a", "a"]) is None  # noqa: SLF001
    model.learn_one({"a": 1.0, "z": 2.0}, True)
    assert model._rows_for(["a", "b"]) is None  # noqa: SLF001
    assert model._rows_for(["z", "b", "a"]) is not None  # noqa: SLF001
    model.learn_values(["a", "a"], [3.0, 3.0], False)  # River learns {"a": 3.0}
    assert dict(model._scaler.counts) == {"a": 2, "z": 1}  # noqa: SLF001
    model.learn_values(["z", "a"], [1.0, 2.0], True)  # on the row model
    was = online.use_compiled(False)
    try:  # the compiled code switched off with a row model held: River's code takes over from it
        model.learn_values(["z", "a"], [1.0, 2.0], True)
    finally:
        online.use_compiled(was)
    assert dict(model._scaler.counts) == {"a": 4, "z": 3}  # noqa: SLF001


def test_online_a_scaler_the_compiled_code_does_not_cover_runs_rivers_own() -> None:
    """A scaler other than River's default (here: no division by the std) is left to River's code,
    whichever path the row takes. (A rolling one holds no floats, which the compiled code refuses
    by itself.)"""
    from river import preprocessing

    names = ["tiny", "const", "int_like", "late"]
    rows = [([x.get(k, float("nan")) for k in names], y) for x, y in _stream(5, 200)]

    def run(compiled: bool) -> tuple[OnlineModel, list[float]]:
        model, got = OnlineModel(warmup=20), []
        model._scaler = preprocessing.StandardScaler(with_std=False)  # noqa: SLF001
        for row, y in rows:
            got += [model.predict_values(names, row), model.learn_values(names, row, y)]
            x = x_dict(names, row)
            got += [model.predict_proba_one(x)]
        return model, got

    _alike_both_ways(run)


def test_online_compiled_paths_decline_what_they_do_not_handle() -> None:
    """Values the compiled loops do not take (an int, a numpy scalar) go to River's own code."""
    from models import online

    _river = online._river  # noqa: SLF001
    if _river is None:
        pytest.skip("models._river is not built")
    model = OnlineModel(warmup=0)
    scaler = model._scaler  # noqa: SLF001
    assert _river.scaler_learn(scaler.counts, scaler.means, scaler.vars, {"a": 1}) is None
    assert _river.scaler_transform(scaler.means, scaler.vars, {"a": np.float64(1.0)}) is None
    assert _river.x_dict(online.Clean, ["a"], [1]) is None
    assert not scaler.counts  # declining changed nothing
    model.learn_one({"a": 1, "b": np.float64(2.0)}, True)  # River's own code takes them
    model.learn_one({"a": 3.0, "b": 2.0}, False)
    assert dict(scaler.counts) == {"a": 2, "b": 2}
    assert scaler.means["a"] == 2.0


def test_x_dict_drops_missing_values() -> None:
    assert x_dict(["a", "b", "c"], np.array([1.0, np.nan, -np.inf])) == {"a": 1.0}
    assert x_dict(["a"], [2]) == {"a": 2.0}
    with pytest.raises(ValueError):
        x_dict(["a", "b"], [1.0])


# --- combine ----------------------------------------------------------------------------------

prob = st.floats(0.0, 1.0)


@given(prob, prob)
def test_combine_identities(x: float, o: float) -> None:
    assert combine(x, o, 0.0) == x
    assert combine(x, 0.0, 1.0) == x
    assert x <= combine(x, o, 0.7) <= 1.0
    assert combine(x, o, 1.0) == pytest.approx(1 - (1 - x) * (1 - o), abs=1e-15)


@given(prob, prob, prob, prob, st.floats(0.0, 1.0))
def test_combine_is_monotone(x1: float, x2: float, o1: float, o2: float, w: float) -> None:
    (x1, x2), (o1, o2) = sorted((x1, x2)), sorted((o1, o2))
    assert combine(x1, o1, w) <= combine(x1, o2, w)  # exactly, in the online score
    assert combine(x1, o1, w) <= combine(x2, o1, w) + 1e-15  # up to one rounding, in xgb


def test_combine_vectorised() -> None:
    x = np.array([0.0, 1e-20, 0.3, 1.0], dtype=np.float32)
    np.testing.assert_array_equal(combine(x, np.zeros(4), 1.0), x)
    np.testing.assert_array_equal(combine(x, np.ones(4), 0.0), x)
    out = combine(x, 0.5, 0.5)
    assert isinstance(out, np.ndarray) and out.shape == (4,)
    np.testing.assert_allclose(out, 1 - (1 - x.astype(np.float64)) * 0.75)
    assert isinstance(combine(0.2, 0.5, 0.5), float)
    for weight in (1.5, -0.1):
        with pytest.raises(ValueError, match=rf"weight must be in \[0, 1\], got {weight}"):
            combine(0.2, 0.5, weight)


def test_combine_computes_in_float64_whatever_the_scores_dtype() -> None:
    """XGBoost and River hand over float32 arrays; the final score is the float64 formula exactly
    (a float32 step moves scores by ~1e-8: enough to flip an alert at the threshold)."""
    rng = np.random.default_rng(1)
    x, o = rng.random(1000).astype(np.float32), rng.random(1000).astype(np.float32)
    want = combine(x.astype(np.float64), o.astype(np.float64), 0.6)
    for xs, os_ in ((x, o), (x, o.astype(np.float64)), (x.astype(np.float64), o)):
        got = combine(xs, os_, 0.6)
        assert got.dtype == np.float64
        np.testing.assert_array_equal(got, want)
    # One Python float with a float32 array (a single score against a batch): still float64.
    one = float(x[0])
    mixed = combine(one, o, 0.6)
    assert mixed.dtype == np.float64
    np.testing.assert_array_equal(mixed, combine(np.full(1000, one), o.astype(np.float64), 0.6))
    mixed = combine(x, 0.37, 0.6)
    assert mixed.dtype == np.float64
    np.testing.assert_array_equal(mixed, combine(x.astype(np.float64), np.full(1000, 0.37), 0.6))


@given(prob, prob, st.floats(0.0, 1.0))
def test_combine_of_two_floats_is_the_array_formula_bit_for_bit(x: float, o: float, w: float) -> None:
    """The scorer combines one transaction's two Python floats at a time: the same float64 value
    as the vectorised formula, to the last bit (an alert at the threshold must not depend on the
    path)."""
    one = combine(x, o, w)
    assert type(one) is float
    assert one == float(combine(np.array([x]), np.array([o]), w)[0])
    x32, o32 = np.float32(x), np.float32(o)  # numpy scalars take the array path: the same value
    assert float(combine(x32, o32, w)) == combine(float(x32), float(o32), w)


def test_xgb_scores_undo_the_positive_weight_of_training() -> None:
    """Weighting frauds 5x in training inflates every probability; the scorer divides the odds
    back, so scores come near an unweighted model's again (what the noisy-or with River assumes),
    and the ranking is untouched. A scorer restored from an older pickle (no weight) uses 1."""
    rng = np.random.default_rng(7)
    X = rng.normal(size=(8000, 3)).astype(np.float32)
    y = (X[:, 0] + rng.normal(size=8000) > 2.2).astype(np.int8)  # noisy labels, ~6 % positives
    weighted = train_xgb(X[:6000], y[:6000], ["a", "b", "c"], nthread=2, params={"scale_pos_weight": 5.0})
    raw = XGBScorer(weighted, ["a", "b", "c"]).score(X[6000:])
    fixed = XGBScorer(weighted, ["a", "b", "c"], positive_weight=5.0)
    scores = fixed.score(X[6000:])
    plain = train_xgb(X[:6000], y[:6000], ["a", "b", "c"], nthread=2)
    reference = XGBScorer(plain, ["a", "b", "c"]).score(X[6000:]).mean()  # trained unweighted
    assert raw.mean() > 1.5 * reference  # inflated
    assert abs(scores.mean() - reference) < abs(raw.mean() - reference) / 2  # near the unweighted level
    assert (np.argsort(scores, kind="stable") == np.argsort(raw, kind="stable")).all()
    restored = pickle.loads(pickle.dumps(fixed))
    assert np.array_equal(restored.score(X[6000:]), scores)
    state = fixed.__getstate__()
    del state["positive_weight"]
    old = XGBScorer.__new__(XGBScorer)
    old.__setstate__(state)
    assert np.array_equal(old.score(X[6000:]), raw)
    with pytest.raises(ValueError):
        XGBScorer(weighted, ["a", "b", "c"], positive_weight=0.0)


def test_online_model_defaults_are_the_settings_defaults() -> None:
    """`OnlineModel()` (tests, notebooks) is the model the flow builds from default settings."""
    from service.runtime import new_online_model
    from service.settings import Settings

    assert repr(OnlineModel()) == repr(new_online_model(Settings()))


@pytest.mark.parametrize("bad", [{"lr": 0.0}, {"l2": -0.1}, {"pos_weight": 0.0}, {"warmup": -1}])
def test_online_model_refuses_each_invalid_parameter_alone(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=r"^need lr > 0, l2 >= 0, pos_weight > 0 and warmup >= 0$"):
        OnlineModel(**bad)  # type: ignore[arg-type]


def test_online_model_accepts_the_edges_and_shows_its_parameters() -> None:
    """No warm-up and no L2 are valid (ready from the first positive); repr names every setting."""
    model = OnlineModel(lr=0.05, l2=0.0, pos_weight=3.0, warmup=0)
    assert not model.ready
    model.learn_one({"a": 1.0}, True)
    assert model.ready and 0.0 < model.predict_proba_one({"a": 1.0}) < 1.0
    assert repr(model) == "OnlineModel(lr=0.05, l2=0.0, pos_weight=3.0, warmup=0, n_learned=1, n_positive=1)"


def test_online_model_is_river_s_weighted_pipeline_and_returns_its_prequential_score() -> None:
    """Exactly StandardScaler | LogisticRegression(SGD) learning positives with `pos_weight`
    and negatives with 1; `learn_one` returns the probability given just before learning (0.0
    during warm-up)."""
    from river import linear_model, optim, preprocessing

    rng = np.random.default_rng(5)
    model = OnlineModel(lr=0.05, l2=0.001, pos_weight=4.0, warmup=20)
    river = preprocessing.StandardScaler() | linear_model.LogisticRegression(
        optimizer=optim.SGD(0.05), l2=0.001
    )
    befores = []
    for i in range(300):
        x = {"a": float(rng.normal()), "b": float(rng.normal())}
        y = bool(x["a"] > 1.0 or i == 3)
        befores.append(model.learn_one(x, y))
        if i >= 20:  # ready: the score before learning, with x already counted by the scaler
            scaler, classifier = river.steps.values()
            scaler.learn_one(x)
            assert befores[-1] == pytest.approx(
                classifier.predict_proba_one(scaler.transform_one(x))[True], abs=1e-12
            )
            classifier.learn_one(scaler.transform_one(x), y, w=4.0 if y else 1.0)
        else:
            assert befores[-1] == 0.0
            river.learn_one(x, y, w=4.0 if y else 1.0)
        probe = {"a": 0.3, "b": -0.2}
        assert model.ready is (i >= 19)
        if model.ready:
            assert model.predict_proba_one(probe) == pytest.approx(
                river.predict_proba_one(probe)[True], abs=1e-12
            )
    assert max(befores[21:]) > 0.5 > min(befores[21:]) > 0.0


def test_x_dict_keeps_finite_values_as_floats_and_names_a_length_mismatch() -> None:
    row = np.array([1.5, np.nan, -np.inf, 2.0], dtype=np.float32)
    x = x_dict(["a", "b", "c", "d"], row)
    assert x == {"a": 1.5, "d": 2.0} and all(type(v) is float for v in x.values())
    with pytest.raises(ValueError, match=r"^3 names but 4 values$"):
        x_dict(["a", "b", "c"], row)


@pytest.mark.parametrize("seed", [6, 7])
def test_online_compiled_classifier_survives_pickling_and_is_rivers_bit_for_bit(seed: int) -> None:
    """The compiled dot product and SGD step update the same weights dict River's VectorDict holds:
    learning resumed after a pickle round trip (a snapshot restored), with River's own code learning
    in between, gives River's floats, keys and pickles."""
    rows = _stream(seed, 900)

    def run(compiled: bool) -> tuple[OnlineModel, list[float]]:
        from models import online

        model, got = OnlineModel(warmup=30, pos_weight=5.0, lr=0.05), []
        for i, (x, y) in enumerate(rows):
            if i % 300 == 299:
                model = pickle.loads(pickle.dumps(model))
            if compiled and 400 <= i < 450:
                online.use_compiled(False)  # River's own learn_one on the shared dict for a while
            got += [model.predict_proba_one(x), model.learn_one(x, y)]
            online.use_compiled(compiled)
        return model, got

    _alike_both_ways(run)


def test_online_a_classifier_the_compiled_code_does_not_cover_runs_rivers_own() -> None:
    """An L2 penalty, another optimizer, values that are not floats: River's own code learns."""
    from river import linear_model, optim

    from models import online

    if online._river is None:  # noqa: SLF001
        pytest.skip("models._river is not built")
    assert online._fast_lr(linear_model.LogisticRegression(l2=0.1)) is None  # noqa: SLF001
    assert online._fast_lr(linear_model.LogisticRegression(optimizer=optim.Adam())) is None  # noqa: SLF001
    assert online._fast_lr(linear_model.LogisticRegression()) is online._river  # noqa: SLF001
    weights = {"a": 1.0, "b": 2}
    assert online._river.lr_dot(weights, {"b": 1.0}) is None  # an int weight  # noqa: SLF001
    assert online._river.lr_step(weights, {"a": 1.0, "b": 1.0}, 0.5, 0.1) is None  # noqa: SLF001
    assert online._river.lr_step(weights, {"a": 1}, 0.5, 0.1) is None  # noqa: SLF001
    assert weights == {"a": 1.0, "b": 2}  # declining changed nothing
    assert online._river.lr_dot(weights, {"a": 3.0, "c": 5.0}) == 3.0  # noqa: SLF001 - no weight: nothing added
    assert online._river.lr_step(weights, {"c": 2.0, "a": 1.0}, 0.5, 0.1) is True  # noqa: SLF001
    assert weights == {"a": 1.0 - 0.5 * 0.1, "b": 2, "c": 0.0 - (2.0 * 0.5) * 0.1}

    def run(compiled: bool) -> tuple[OnlineModel, list[float]]:
        model, got = OnlineModel(warmup=20, l2=0.01), []
        for x, y in _stream(8, 300):
            got += [model.predict_proba_one(x), model.learn_one(x, y)]
        return model, got

    _alike_both_ways(run)


_FLOAT32 = st.one_of(
    st.floats(width=32, allow_nan=True, allow_infinity=True),
    st.integers(0, 70_000).map(float),
    st.sampled_from([0.0, -0.0, 250.0, 251.0, 65535.0, 65536.0, -1.0]),
)


@given(st.lists(st.lists(_FLOAT32, min_size=6, max_size=6), min_size=1, max_size=8), st.integers(0, 8))
def test_the_scorer_matrix_from_packed_copies_is_the_converted_values(
    rows: list[list[float]], n_labelled: int
) -> None:
    """The flow's scorer builds its float32 matrix from the copies `pending` packed and from the
    labelled vectors' float32 arrays; it is the matrix converting every value gives (NaN where
    NaN, -0.0 where -0.0)."""
    from array import array

    from features.engine import FeatureVector
    from features.events import Transaction
    from features.table import pack_vector
    from models.serving import _packed_matrix

    txn = Transaction("t", 1_700_000_000_000, "c", "m", 1.0, "EUR", "5411", "FR", "pos")
    vectors = [FeatureVector(txn, r, False, pack_vector(r)) for r in rows]
    labelled = [array("f", r) for r in rows[:n_labelled]]
    want = np.asarray([v.values for v in vectors] + labelled, dtype=np.float32)
    got = _packed_matrix(vectors, list(labelled), len(NAMES))
    assert got is not None and got.dtype == np.float32 and got.shape == want.shape
    assert np.array_equal(got, want, equal_nan=True)
    finite = ~np.isnan(want)  # a NaN, whatever its sign or payload, is XGBoost's missing value
    assert np.array_equal(np.signbit(got[finite]), np.signbit(want[finite]))


def test_the_scorer_converts_the_values_when_a_packed_copy_is_missing_or_the_wrong_width() -> None:
    """No packed copy (batch replays), a copy of another width, a copy that is not a packed vector,
    or a labelled vector that is not float32: the scorer converts the values instead (and a
    row of the wrong width is refused there, as before)."""
    from array import array

    from features.engine import FeatureVector
    from features.events import Transaction
    from features.table import pack_vector
    from models.serving import _packed_matrix

    txn = Transaction("t", 1_700_000_000_000, "c", "m", 1.0, "EUR", "5411", "FR", "pos")
    row = [1.0, 2.5, math.nan, 0.0, 300.0, -4.0]
    ok = FeatureVector(txn, row, False, pack_vector(row))
    assert _packed_matrix([ok], [array("f", row)], 6) is not None
    assert _packed_matrix([FeatureVector(txn, row, False)], [], 6) is None
    assert _packed_matrix([FeatureVector(txn, row, False, pack_vector(row[:5]))], [], 6) is None
    assert _packed_matrix([FeatureVector(txn, row, False, b"\xfe\x01")], [], 6) is None
    assert _packed_matrix([ok], [row], 6) is None
    assert _packed_matrix([ok], [array("d", row)], 6) is None
    assert _packed_matrix([ok], [array("f", row[:5])], 6) is None
