"""Benchmarks of celery-unique; run one with ``python -m benchmarks.<name>``."""
