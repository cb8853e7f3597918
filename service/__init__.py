"""What the flow and the CLI both need: settings, Prometheus telemetry, Redis connections and the
embedded server, and the runtime resolved from settings. Imports `features` and `models`, never
`flows` or `fraud` (tests/test_architecture.py)."""
