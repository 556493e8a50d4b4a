"""Fixtures for the job-system tests: `db_url`, `db_engine` and `store` (both dialects) and the tiny model
(`tiny_model`) live in tests/conftest.py."""
