"""Event schema and the event-time feature engine. Pure Python: no bytewax, no redis."""
