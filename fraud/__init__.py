"""The CLI and its tools: producer, consumers, synthetic data, training. The top layer: it may
import `features`, `models`, `service` and `flows`; none of them imports it."""
