"""Offline XGBoost: training from a replayed file and vectorised micro-batch scoring.

The flow scores micro-batches, so everything here takes a 2-D float matrix whose columns follow
the pipeline's fixed ordered feature list (NaN = missing, which XGBoost routes natively) and makes
exactly one XGBoost call per batch: per-transaction calls would spend most of their time in
Python/C++ crossing overhead rather than in the trees.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np
import xgboost as xgb

from models.evaluation import average_precision
from models.matrix import Matrix

DEFAULT_PARAMS: dict[str, Any] = {
    "objective": "binary:logistic",
    "tree_method": "hist",
    "max_depth": 5,
    "eta": 0.08,
    "min_child_weight": 1.0,
    "subsample": 0.8,
    "colsample_bytree": 0.8,
    "lambda": 1.0,
    "max_bin": 256,
    # Early stopping watches the LAST metric: aucpr tracks the rare class, auc is for the log.
    "eval_metric": ["auc", "aucpr"],
}
"""Defaults for ~30k rows with ~1% positives.

Depth 5 and eta 0.08 over up to 300 rounds is a mid-capacity model that does not memorise ~300
positives. `scale_pos_weight` is 1 here; `SEARCH_GRID` also tries 5, and `XGBScorer` then takes
the weight's inflation of the probabilities back out, since the scores are consumed as
probabilities (noisy-or combination with the online model, a precision-driven alert threshold).
"""

NUM_BOOST_ROUND = 300
EARLY_STOPPING_ROUNDS = 40  # aucpr on a few hundred positives is noisy: don't stop on a blip


CHUNK_ROWS = 65_536  # rows handed to XGBoost at a time when it builds a training matrix


class _Rows(xgb.DataIter):
    """Rows `rows` of `X` with their labels, `CHUNK_ROWS` at a time: XGBoost builds its quantised
    training matrix from the chunks, so the selection is never copied whole (a year of rows would
    be copied once more, then again as XGBoost's own float matrix). With `cache_prefix` XGBoost
    keeps that matrix on disk there, in pages it reads back at each round."""

    def __init__(
        self, X: Matrix, y: np.ndarray, rows: np.ndarray, names: list[str], cache_prefix: str | None = None
    ) -> None:
        self.X, self.y, self.rows, self.names, self.at = X, y, rows, names, 0
        super().__init__(cache_prefix=cache_prefix, release_data=True)

    def next(self, input_data: Any) -> bool:
        if self.at >= len(self.rows):
            return False
        chunk = self.rows[self.at : self.at + CHUNK_ROWS]
        input_data(
            data=np.ascontiguousarray(self.X[chunk], dtype=np.float32),
            label=self.y[chunk],
            feature_names=self.names,
        )
        self.at += CHUNK_ROWS
        return True

    def reset(self) -> None:
        self.at = 0


def _matrix(X: np.ndarray, n_features: int) -> np.ndarray:
    """C-contiguous float32 2-D view of `X`, the layout XGBoost reads without copying."""
    arr = np.ascontiguousarray(X, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[1] != n_features:
        raise ValueError(f"expected a (n, {n_features}) matrix, got shape {arr.shape}")
    return arr


def train_xgb(
    X: Matrix,
    y: np.ndarray,
    feature_names: list[str],
    *,
    device: str = "cpu",
    nthread: int = 0,
    seed: int = 0,
    params: dict[str, Any] | None = None,
    eval_set: tuple[np.ndarray, np.ndarray] | None = None,
    rows: np.ndarray | None = None,
) -> xgb.Booster:
    """Train a binary fraud classifier; `params` override `DEFAULT_PARAMS` key by key.

    `rows` (indices or a boolean mask) selects the training rows of `X` and `y` without copying
    them: XGBoost reads them in chunks into its quantised matrix (what `tree_method="hist"`
    trains on). On the CPU that matrix is kept on disk (`ExtMemQuantileDMatrix`, in a temporary
    directory removed when training ends) and read back page by page at each round: the same
    model as the in-memory `QuantileDMatrix`, whose index costs ~5 bytes a value (as much as the
    floats) once some values are missing. On a GPU it is built in memory.

    With `eval_set`, training stops once eval aucpr has not improved for `EARLY_STOPPING_ROUNDS`
    rounds and the returned booster is sliced to the best iteration, so that saving and
    `inplace_predict` use exactly the model that was selected (XGBoost would otherwise keep and
    predict with the extra rounds). `nthread=0` means all cores (fine offline; the flow scores
    with a scorer of its own thread count). The booster records `feature_names`.
    """
    names = list(feature_names)
    if len(set(names)) != len(names):
        raise ValueError("feature_names contains duplicates")
    if X.ndim != 2 or X.shape[1] != len(names):
        raise ValueError(f"expected a (n, {len(names)}) matrix, got shape {X.shape}")
    labels = np.asarray(y, dtype=np.float32)
    merged = {**DEFAULT_PARAMS, "device": device, "nthread": nthread, "seed": seed}
    merged.update(params or {})
    if rows is None:
        selected = np.arange(len(X))
    else:
        selected = np.flatnonzero(rows) if rows.dtype == bool else np.asarray(rows)
    num_round = int(merged.pop("num_boost_round", NUM_BOOST_ROUND))
    with tempfile.TemporaryDirectory(prefix="fraud-xgb-") as cache:
        # On the CPU the quantised matrix lives on disk: the same model, a fraction of the memory.
        on_disk = device == "cpu"
        kind = xgb.ExtMemQuantileDMatrix if on_disk else xgb.QuantileDMatrix
        rows_in = _Rows(
            X, labels, selected, names, cache_prefix=os.path.join(cache, "train") if on_disk else None
        )
        dtrain: xgb.DMatrix = kind(rows_in, missing=np.nan, nthread=nthread, max_bin=int(merged["max_bin"]))
        evals: list[tuple[xgb.DMatrix, str]] = []
        if eval_set is not None:
            X_eval, y_eval = eval_set
            deval = xgb.QuantileDMatrix(
                _matrix(X_eval, len(names)),
                label=np.asarray(y_eval, dtype=np.float32),
                feature_names=names,
                missing=np.nan,
                nthread=nthread,
                ref=dtrain,
            )
            evals.append((deval, "eval"))
        booster = xgb.train(
            merged,
            dtrain,
            num_boost_round=num_round,
            evals=evals,
            early_stopping_rounds=EARLY_STOPPING_ROUNDS if evals else None,
            verbose_eval=False,
        )
        if evals:
            booster = booster[: booster.best_iteration + 1]
        del dtrain, evals  # before their cache files go
    return booster


def positive_weight(params: dict[str, Any]) -> float:
    """The `scale_pos_weight` a set of training parameters used (1 when absent)."""
    return float(params.get("scale_pos_weight", 1.0))


class XGBScorer:
    """A trained booster bound to the pipeline's feature order, device and thread count.

    The booster is copied so that pinning `nthread`/`device` never changes a booster the caller
    still uses. The thread count matters in the flow: Bytewax owns a core per worker, and XGBoost's
    default (all cores per call) would oversubscribe the machine.

    `positive_weight`: the `scale_pos_weight` the booster was trained with. Counting each fraud w
    times multiplies the odds the booster learns by about w; scores divide them back
    (`p / (p + w (1 - p))`, the prior correction), so that they stay near probabilities of the real
    fraud rate, which the noisy-or combination with the online model assumes. Rankings (AUC, AP)
    are unchanged.
    """

    def __init__(
        self,
        booster: xgb.Booster,
        feature_names: Sequence[str],
        *,
        device: str = "cpu",
        nthread: int = 1,
        positive_weight: float = 1.0,
    ) -> None:
        if not positive_weight > 0:
            raise ValueError(f"positive_weight must be > 0, got {positive_weight}")
        self.positive_weight = float(positive_weight)
        self.feature_names: list[str] = list(feature_names)
        self.device = device
        self.nthread = nthread
        if booster.feature_names is not None and list(booster.feature_names) != self.feature_names:
            raise ValueError("booster was trained on different feature names than the ones given")
        n_model = booster.num_features()
        if n_model != len(self.feature_names):
            raise ValueError(f"booster expects {n_model} features, got {len(self.feature_names)}")
        self.booster = booster.copy()
        self._configure()

    def _configure(self) -> None:
        """Pin runtime parameters; they are not part of the saved model, so re-applied on load."""
        self.booster.set_param({"nthread": self.nthread, "device": self.device})

    def score(self, X: np.ndarray) -> np.ndarray:
        """Fraud probability per row, float64, from ONE `inplace_predict` call on the batch."""
        arr = _matrix(X, len(self.feature_names))
        if arr.shape[0] == 0:
            return np.empty(0, dtype=np.float64)
        out = self.booster.inplace_predict(arr, missing=np.nan)
        p = np.asarray(out, dtype=np.float64).reshape(arr.shape[0])
        w = self.positive_weight
        return p if w == 1.0 else p / (p + w * (1.0 - p))

    def contributions(self, X: np.ndarray, top_k: int) -> list[list[tuple[str, float, float]]]:
        """Per row, up to `top_k` `(feature, value, contribution)` with the largest positive SHAP.

        Contributions are in log-odds (margin) space and come from one `pred_contribs` call for
        the whole batch; the bias column is dropped. Only features that pushed the score UP are
        reasons for an alert, so non-positive contributions are never listed. Values are the
        row's raw inputs (NaN for a missing feature, whose missing-branch can still contribute).
        """
        arr = _matrix(X, len(self.feature_names))
        if arr.shape[0] == 0 or top_k <= 0:
            return [[] for _ in range(arr.shape[0])]
        dmat = xgb.DMatrix(arr, feature_names=self.feature_names, missing=np.nan, nthread=self.nthread)
        contribs = self.booster.predict(dmat, pred_contribs=True)[:, :-1]
        k = min(top_k, contribs.shape[1])
        order = np.argsort(-contribs, axis=1, kind="stable")[:, :k]
        top = np.take_along_axis(contribs, order, axis=1)
        reasons: list[list[tuple[str, float, float]]] = []
        for i in range(arr.shape[0]):
            reasons.append(
                [
                    (self.feature_names[j], float(arr[i, j]), float(c))
                    for j, c in zip(order[i].tolist(), top[i].tolist(), strict=True)
                    if c > 0.0
                ]
            )
        return reasons

    def score_with_reasons(
        self, X: np.ndarray, top_k: int, *, min_score: float | None = None
    ) -> tuple[np.ndarray, list[list[tuple[str, float, float]]]]:
        """`score(X)` plus `contributions` for the rows that need reasons.

        Exact TreeSHAP costs orders of magnitude more than a prediction, so with `min_score` set,
        typically the alert threshold, reasons are computed (in one call) only for rows
        scoring at or above it; other rows get `[]`. `None` explains every row.
        """
        arr = _matrix(X, len(self.feature_names))
        scores = self.score(arr)
        if min_score is None:
            return scores, self.contributions(arr, top_k)
        reasons: list[list[tuple[str, float, float]]] = [[] for _ in range(arr.shape[0])]
        rows = np.flatnonzero(scores >= min_score)
        if rows.size and top_k > 0:
            for i, row_reasons in zip(rows.tolist(), self.contributions(arr[rows], top_k), strict=True):
                reasons[i] = row_reasons
        return scores, reasons

    def __getstate__(self) -> dict[str, Any]:
        """Pickle the booster as its UBJSON bytes (stable across processes and snapshots)."""
        state = self.__dict__.copy()
        state["booster"] = bytes(self.booster.save_raw(raw_format="ubj"))
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        raw = state.pop("booster")
        state.setdefault("positive_weight", 1.0)  # pickled before scores were corrected for it
        self.__dict__.update(state)
        self.booster = xgb.Booster()
        self.booster.load_model(bytearray(raw))
        self._configure()


SEARCH_GRID: tuple[dict[str, Any], ...] = tuple(
    {"max_depth": depth, "min_child_weight": mcw, "scale_pos_weight": spw, "eta": 0.1}
    for depth in (3, 6)
    for mcw in (1.0, 10.0)
    for spw in (1.0, 5.0)
)
"""The small search `tune_xgb` runs: shallow or deep trees, small or large leaves, positives
weighted 1 or 5 (class imbalance; `XGBScorer(positive_weight=...)` takes the weight's inflation of
the probabilities back out). Eight fits, each stopped early on the
validation period's aucpr; the one with the best validation average precision wins."""


def tune_xgb(
    X: Matrix,
    y: np.ndarray,
    feature_names: list[str],
    eval_set: tuple[np.ndarray, np.ndarray],
    *,
    grid: Sequence[dict[str, Any]] = SEARCH_GRID,
    device: str = "cpu",
    nthread: int = 0,
    seed: int = 0,
    rows: np.ndarray | None = None,
) -> tuple[xgb.Booster, dict[str, Any], list[dict[str, Any]]]:
    """Fit one booster per parameter set of `grid` on `rows` of `X` (all of them by default), each
    early-stopped on `eval_set`; return the one with the highest average precision there, its
    parameters, and every candidate's result."""
    X_eval, y_eval = eval_set
    best: tuple[float, xgb.Booster, dict[str, Any]] | None = None
    log: list[dict[str, Any]] = []
    for params in grid:
        booster = train_xgb(
            X, y, feature_names, device=device, nthread=nthread, seed=seed, params=params, eval_set=eval_set,
            rows=rows,
        )  # fmt: skip
        scores = XGBScorer(booster, feature_names, device=device, nthread=nthread).score(X_eval)  # ranks only
        ap = average_precision(y_eval, scores)
        log.append({**params, "rounds": booster.num_boosted_rounds(), "valid_ap": ap})
        if best is None or ap > best[0]:
            best = (ap, booster, dict(params))
    if best is None:
        raise ValueError("the search grid is empty")
    return best[1], best[2], log
