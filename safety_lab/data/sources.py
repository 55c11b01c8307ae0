"""Moved to `safety_lab.sources`; this alias goes once run.py, bench/sweep.py and tests/test_config.py import that."""
from safety_lab.sources import checked_suite, load_examples, load_suites  # noqa: F401
