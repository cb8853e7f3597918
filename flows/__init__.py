"""Bytewax dataflows and their connectors (files, Redis)."""
