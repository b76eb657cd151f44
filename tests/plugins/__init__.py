"""pytest plugins shared by every test folder, registered in tests/conftest.py.

`servers`: the PostgreSQL clusters and a fresh database per test. `replicator`: the one
etl-config.toml builder, the in-process helpers and the `python -m replicator run` runner.
"""
