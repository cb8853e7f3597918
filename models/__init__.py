"""Models: offline XGBoost, online River, score combination, artifacts and evaluation metrics.

Pure Python on purpose: nothing here imports bytewax, redis, `service`, `flows` or `fraud`, and
nothing reads the environment. Configuration arrives as function and constructor arguments, so
every piece can be trained, evaluated and tested without a running flow. Submodules are imported
explicitly (`from models.xgb import XGBScorer`) so that `models.evaluation` does not pay for
xgboost/river.
"""
