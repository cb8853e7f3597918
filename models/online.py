"""River online model: learns from fraud labels as they arrive, days after scoring.

The caller keeps the feature values a transaction was SCORED with and hands them to `learn_one`
when its label arrives, so the model learns what was knowable at decision time (no leakage from
features computed later). It complements the offline XGBoost model with patterns that appeared
after training; `models.combine` merges the two scores.
"""

from __future__ import annotations

from array import array
from collections.abc import Mapping, Sequence
from itertools import compress
from math import inf, isfinite
from typing import Any

from river import linear_model, optim, preprocessing, utils
from river.utils.math import clamp, sigmoid

try:  # the compiled scaler updates and feature dict (setup.py); River's own code without them
    import models._river as _river
except ImportError:  # pragma: no cover - exercised by the tests through `use_compiled(False)`
    _river = None

_compiled = _river


class Clean(dict[str, float]):
    """A feature dict already without NaN/inf (what `x_dict` builds): not copied again."""


def x_dict(names: Sequence[str], row: Sequence[float] | Any) -> dict[str, float]:
    """Feature dict for River from an ordered row, without missing values.

    River has no notion of NaN (one NaN would poison the scaler's running mean forever), so
    missing features are simply absent; after standard scaling an absent feature contributes
    exactly what an average value would. Infinities are dropped for the same reason.
    """
    values = row.tolist() if hasattr(row, "tolist") else row  # numpy scalars are slow to iterate
    if len(names) != len(values):
        raise ValueError(f"{len(names)} names but {len(values)} values")
    if _compiled is not None:
        x = _compiled.x_dict(Clean, names, values)
        if x is not None:
            return x
    # The finite values, as floats, without a Python-level loop per feature.
    return Clean(compress(zip(names, map(float, values), strict=True), map(isfinite, values)))


def use_compiled(on: bool) -> bool:
    """Run the compiled scaler updates and `x_dict` (when built) or River's own Python code; returns
    whether the compiled ones were in use. Both give the same floats: the tests run both."""
    global _compiled
    was = _compiled is not None
    _compiled = _river if on else None
    return was


def _fast(scaler: preprocessing.StandardScaler) -> Any:
    """The compiled module when it is in use and covers this scaler (River's default: running
    statistics, scaled by the standard deviation), else None."""
    return _compiled if scaler.window_size is None and scaler.with_std is True else None


def _fast_lr(classifier: linear_model.LogisticRegression) -> Any:
    """The compiled module when it is in use and covers this classifier (River's default: SGD on
    the log loss with Zeros-initialised weights, no L1/L2 penalty), else None."""
    if _compiled is None or type(classifier) is not linear_model.LogisticRegression:
        return None
    if classifier.l1 != 0 or classifier.l2 != 0 or type(classifier.optimizer) is not optim.SGD:
        return None
    if (
        type(classifier.loss) is not optim.losses.Log
        or type(classifier.initializer) is not optim.initializers.Zeros
    ):
        return None
    return _compiled


def scaler_learn(scaler: preprocessing.StandardScaler, x: dict[str, float]) -> None:
    """`scaler.learn_one(x)`, by the compiled loop when it takes `x` (same floats, same keys)."""
    fast = _fast(scaler)
    if fast is None or fast.scaler_learn(scaler.counts, scaler.means, scaler.vars, x) is None:
        scaler.learn_one(x)


def scaler_transform(scaler: preprocessing.StandardScaler, x: dict[str, float]) -> dict[str, float]:
    """`scaler.transform_one(x)`, by the compiled loop when it takes `x` (same floats, same keys)."""
    fast = _fast(scaler)
    out: dict[str, float] | None = (
        None if fast is None else fast.scaler_transform(scaler.means, scaler.vars, x)
    )
    return scaler.transform_one(x) if out is None else out


def _clean(x: Mapping[str, float]) -> dict[str, float]:
    """`x` without NaN/inf: as it is when `x_dict` built it, else a cleaned copy."""
    if type(x) is Clean:
        return x
    return {k: float(v) for k, v in x.items() if v - v == 0}


_DERIVED = frozenset({"_shared_weights", "_rows", "_rows_ahead"})  # rebuilt from River's objects


class _RiverPart:
    """One of the model's River objects, held in its instance dict under the attribute's own name
    (the pickled state, as ever). While `learn_values` / `predict_values` run on the row model
    (`_rows`), River's objects lag behind it: reading or replacing one through this attribute
    writes the row model back first and drops it (the reader may change the object);
    `learn_values` builds it again from River's objects."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, model: OnlineModel | None, owner: type | None = None) -> Any:
        if model is None:
            return self
        model._release_rows()  # noqa: SLF001 - the model's own helper
        return model.__dict__[self.name]

    def __set__(self, model: OnlineModel, value: Any) -> None:
        model._release_rows()  # noqa: SLF001
        model.__dict__[self.name] = value


class OnlineModel:
    """StandardScaler | LogisticRegression(SGD), class-weighted, with a warm-up gate.

    Class imbalance: positives are learned with sample weight `pos_weight`. River 0.26.1's
    `LogisticRegression.learn_one(x, y, w=1.0)` accepts a weight and `Pipeline.learn_one`
    routes `w` only to the steps whose `learn_one` declares it, so the scaler's statistics stay
    unweighted (they describe the traffic) while the gradient of a positive is scaled. This is
    cheaper than repeating `learn_one` and does not count a positive several times in the scaler.

    Warm-up: an untrained logistic regression says 0.5 for everything, which the noisy-or
    combination would read as strong evidence. So `predict_proba_one` returns 0.0 (no evidence)
    until `warmup` labels including at least one positive have been learned.

    Picklable (Bytewax snapshots it): only River objects and plain counters are held.
    """

    def __init__(
        self,
        *,
        lr: float = 0.01,
        l2: float = 0.0,
        pos_weight: float = 1.0,
        warmup: int = 5000,
    ) -> None:
        if lr <= 0 or l2 < 0 or pos_weight <= 0 or warmup < 0:
            raise ValueError("need lr > 0, l2 >= 0, pos_weight > 0 and warmup >= 0")
        self.lr = lr
        self.l2 = l2
        self.pos_weight = pos_weight
        self.warmup = warmup
        self.n_learned = 0
        self.n_positive = 0
        self._scaler = preprocessing.StandardScaler()
        self._classifier = linear_model.LogisticRegression(optimizer=optim.SGD(lr), l2=l2)

    _scaler = _RiverPart()
    _classifier = _RiverPart()

    @property
    def ready(self) -> bool:
        """Whether predictions are trusted: warm-up reached and at least one positive seen."""
        return self.n_learned >= self.warmup and self.n_positive > 0

    def learn_one(self, x: Mapping[str, float], y: bool) -> float:
        """Learn one labelled transaction from the features it was scored with; return the
        probability the model gave it just before (0.0 while not `ready`): its prequential score.
        The scaler has counted `x` by then, the classifier has not learned it."""
        label = bool(y)
        # What River's `scaler | classifier` pipeline's `learn_one(x, label, w=...)` does, without
        # its routing on every call: the scaler learns `x` (unweighted), then the classifier the scaled `x`.
        x = _clean(x)
        scaler_learn(self._scaler, x)
        return self._learn_scaled(scaler_transform(self._scaler, x), label)

    def _learn_scaled(self, xs: dict[str, float], label: bool) -> float:
        """The classifier's part of `learn_one`, once the scaler has learned the row and scaled it."""
        clf, w = self._classifier, self.pos_weight if label else 1.0
        fast = _fast_lr(clf)
        raw = fast.lr_dot(weights := self._weights(), xs) if fast is not None else None
        if raw is None:
            before = self._predict_scaled(xs) if self.ready else 0.0
            clf.learn_one(xs, label, w=w)
        else:
            before, gradient, lr = self._sgd(clf, raw, label)
            if fast.lr_step(weights, xs, gradient, lr) is None:
                raise AssertionError("lr_step declined what lr_dot accepted")  # pragma: no cover
            clf.optimizer.n_iterations += 1
        self.n_learned += 1
        self.n_positive += int(label)
        return before

    def _learn_rows(self, row: Sequence[float], state: array, raw: float, label: bool) -> float:
        """The classifier's part of `learn_values` on the row model, once `rows_learn` has scaled
        the row and returned the dot product `raw`."""
        clf = self.__dict__["_classifier"]
        before, gradient, lr = self._sgd(clf, raw, label)
        if _compiled.rows_step(row, state, gradient, lr) is None:
            raise AssertionError("rows_step declined what rows_learn accepted")  # pragma: no cover
        clf.optimizer.n_iterations += 1
        self.n_learned += 1
        self.n_positive += int(label)
        return before

    def _sgd(
        self, clf: linear_model.LogisticRegression, raw: float, label: bool
    ) -> tuple[float, float, float]:
        """River's `LogisticRegression.learn_one(xs, label, w)` (`GLM._fit` with SGD) around its
        weights' step, River's own functions in its order, for the dot product `raw` of the scaled
        row with the weights: updates the intercept and returns the probability before learning
        (0.0 while not `ready`), the clipped loss gradient and the step's learning rate. The caller
        steps the weights, then counts the iteration."""
        w = self.pos_weight if label else 1.0
        raw += clf.intercept
        before = float(sigmoid(raw)) if self.ready else 0.0
        opt = clf.optimizer
        gradient = float(
            clamp(clf.loss.gradient(y_true=label, y_pred=raw) * w, -clf.clip_gradient, clf.clip_gradient)
        )
        clf.intercept -= clf.intercept_lr.get(opt.n_iterations) * gradient
        return before, gradient, float(opt.learning_rate)

    def _weights(self) -> dict[str, float]:
        """The dict the classifier's weights live in, shared with its VectorDict: River 0.26 gives
        no handle on a VectorDict's dict, so the model builds the VectorDict around a dict of its own
        (`VectorDict(d)` keeps a reference; River's learn mode masks the same dict). A classifier
        whose VectorDict is another one (unpickled, replaced) is given one around a copy first."""
        clf, shared = self._classifier, getattr(self, "_shared_weights", None)
        if shared is not None and clf._weights is shared[0]:  # noqa: SLF001 - no public handle
            return shared[1]
        weights = clf._weights.to_dict()  # noqa: SLF001 - a copy of the same keys and values
        clf._weights = utils.VectorDict(weights)  # noqa: SLF001
        self._shared_weights = (clf._weights, weights)  # noqa: SLF001
        return weights

    def __getstate__(self) -> dict[str, Any]:
        """River's objects, up to date, without the handle on the weights dict (the pickled
        VectorDict holds them) nor the row model (rebuilt from River's objects when needed)."""
        self._write_back()
        return {k: v for k, v in self.__dict__.items() if k not in _DERIVED}

    def _rows_for(self, names: Sequence[str]) -> tuple[Sequence[str], array, list[int]] | None:
        """The row model for `names`: (names, state, order), `state` the 5n doubles `rows_learn`
        works on (counts, means, variances, weights, last scaled row), `order` the names' indices
        in the order River's dicts hold them. Built from River's objects on first use; None when
        the compiled code is off or does not cover the model (another scaler or classifier, a name
        twice, keys outside `names`, River's dicts not all holding the same keys in the same order,
        a value that is not a plain float or a count past 2**53)."""
        rows = self.__dict__.get("_rows")
        if (
            rows is not None
            and _compiled is not None
            and (rows[0] is names or tuple(rows[0]) == tuple(names))
        ):
            return rows
        self._release_rows()
        scaler, clf = self.__dict__["_scaler"], self.__dict__["_classifier"]
        if _compiled is None or _fast(scaler) is None or _fast_lr(clf) is None:
            return None
        index = {name: i for i, name in enumerate(names)}
        keys, n = list(scaler.counts), len(names)
        weights = clf._weights  # noqa: SLF001 - River 0.26 has no public handle
        if len(index) != n or any(list(d) != keys for d in (scaler.means, scaler.vars, weights)):
            return None
        state = array("d", bytes(40 * n))
        for key in keys:
            i = index.get(key)
            c, m, v, w = scaler.counts[key], scaler.means[key], scaler.vars[key], weights[key]
            if i is None or type(c) is not int or not 0 < c < 2**53 or not 0.0 <= v < inf:
                return None
            if type(m) is not float or type(v) is not float or type(w) is not float:
                return None
            state[i], state[n + i], state[2 * n + i], state[3 * n + i] = c, m, v, w
        rows = (names, state, [index[key] for key in keys])
        self.__dict__["_rows"], self.__dict__["_rows_ahead"] = rows, False
        return rows

    def _write_back(self) -> None:
        """Write what the row model learned into River's objects (their keys in first-seen order)."""
        rows = self.__dict__.get("_rows")
        if rows is None or not self.__dict__.get("_rows_ahead"):
            return
        names, state, order = rows
        n, scaler, clf = len(names), self.__dict__["_scaler"], self.__dict__["_classifier"]
        counts, means, variances, weights = scaler.counts, scaler.means, scaler.vars, {}
        counts.clear(), means.clear(), variances.clear()
        for i in order:
            key = names[i]
            counts[key], means[key], variances[key] = int(state[i]), state[n + i], state[2 * n + i]
            weights[key] = state[3 * n + i]
        clf._weights = utils.VectorDict(weights)  # noqa: SLF001
        self.__dict__["_shared_weights"] = (clf._weights, weights)  # noqa: SLF001
        self.__dict__["_rows_ahead"] = False

    def _release_rows(self) -> None:
        """River's objects up to date and the row model dropped."""
        self._write_back()
        self.__dict__.pop("_rows", None)

    def learn_values(self, names: Sequence[str], values: Sequence[float] | Any, y: bool) -> float:
        """`learn_one(x_dict(names, values), y)`: the same model and the same return value, in one
        compiled pass over the features when `models._river` is built (no intermediate dict)."""
        rows = self._rows_for(names)
        if rows is not None:
            # A float32 array (a labelled vector's values) is read in place by the compiled code.
            f32 = type(values) is array and values.typecode == "f"
            row = values if f32 else values.tolist() if hasattr(values, "tolist") else values
            if len(row) != len(names):
                raise ValueError(f"{len(names)} names but {len(row)} values")
            raw = _compiled.rows_learn(row, rows[1], rows[2])
            if raw is not None:
                self.__dict__["_rows_ahead"] = True
                return self._learn_rows(row, rows[1], raw, bool(y))
        scaler, fast = self._scaler, _fast(self._scaler)
        if fast is not None:
            row = values.tolist() if hasattr(values, "tolist") else values
            xs = fast.learn_row(names, row, scaler.counts, scaler.means, scaler.vars)
            if xs is not None:
                return self._learn_scaled(xs, bool(y))
        return self.learn_one(x_dict(names, values), y)

    def predict_values(self, names: Sequence[str], values: Sequence[float] | Any) -> float:
        """`predict_proba_one(x_dict(names, values))`, in one compiled pass when it can."""
        if not self.ready:
            return 0.0
        rows = self._rows_for(names)
        if rows is not None:
            row = values.tolist() if hasattr(values, "tolist") else values
            raw = _compiled.rows_predict(row, rows[1]) if len(row) == len(names) else None
            if raw is not None:
                return float(sigmoid(raw + self.__dict__["_classifier"].intercept))
        scaler, fast = self._scaler, _fast(self._scaler)
        if fast is not None:
            row = values.tolist() if hasattr(values, "tolist") else values
            xs = fast.predict_row(names, row, scaler.counts, scaler.means, scaler.vars)
            if xs is not None:
                return self._predict_scaled(xs)
        return self.predict_proba_one(x_dict(names, values))

    def predict_proba_one(self, x: Mapping[str, float]) -> float:
        """Probability of fraud in [0, 1]; 0.0 while not `ready`. Never changes the model.

        Features the scaler has never seen are dropped first: River would scale them to 0.0
        anyway, but looking them up inserts keys into the scaler's defaultdicts, a (harmless but
        real) mutation on a predict path that must be side-effect free.
        """
        if not self.ready:
            return 0.0
        seen = self._scaler.counts
        x = _clean(x)
        xs = x if seen.keys() >= x.keys() else {k: v for k, v in x.items() if k in seen}
        return self._predict_scaled(scaler_transform(self._scaler, xs))

    def _predict_scaled(self, xs: dict[str, float]) -> float:
        """The classifier's `predict_proba_one(xs)[True]`: the dot product compiled when it can be."""
        clf = self._classifier
        fast = _fast_lr(clf)
        raw = fast.lr_dot(self._weights(), xs) if fast is not None else None
        if raw is None:
            return float(clf.predict_proba_one(xs)[True])
        return float(sigmoid(raw + clf.intercept))  # River's `loss.mean_func` for the log loss

    def __repr__(self) -> str:
        return (
            f"OnlineModel(lr={self.lr}, l2={self.l2}, pos_weight={self.pos_weight}, "
            f"warmup={self.warmup}, n_learned={self.n_learned}, n_positive={self.n_positive})"
        )
