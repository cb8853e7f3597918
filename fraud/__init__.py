"""Application layer: settings, metrics, CLI, synthetic data and Redis helpers."""
