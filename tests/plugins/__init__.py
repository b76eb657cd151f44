"""pytest plugins shared by every test folder, registered in tests/conftest.py.

`servers`: the PostgreSQL clusters and a fresh database per test. `replicator`: the one
etl-config.toml builder, the in-process helpers and the `python -m replicator run` runner.
`pgbouncer`: a transaction-mode pgbouncer before the destination (the Supabase pooler) and
the Supabase roles (a non-superuser owner, superset_readonly, service_role).
"""
