"""Test scaffolding (not installed): process drills, the fuzzer, Redis test servers, ports and RSS."""
