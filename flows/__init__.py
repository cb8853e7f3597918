"""Bytewax dataflows and their connectors (files, Redis). Imports `features`, `models` and
`service`, never `fraud` (tests/test_architecture.py)."""
