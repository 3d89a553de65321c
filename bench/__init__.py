"""Benchmark of eventsync against a bare DynamoDB scan and a bare MQTT publish loop.

Run it from the repository root with `.venv/bin/python -m bench --help`.
`docs/benchmarks.md` describes what it measures and records its results.
"""
