"""Dev and demo tooling, kept apart from the replicator's data path.

Nothing under `replicator/` outside this package imports it, except `replicator
seed` and `replicator demo` in cli.py, lazily. What is here:

- `odoo`: the six Odoo 17 tables (definitions from `data/odoo17_tables.json`) and their DDL.
- `seed`: `seed()`, create those tables on a test source and fill them, built from
  `reference` (fixed ids and word lists), `values` (column values), `partners`
  (the res_partner layout), `entries` (journal entries), `generator` (the row
  streams) and `loader` (COPY loading, indexes, analyze).
- `workload`: an Odoo-like OLTP write mix against a seeded database.
- `localpg`: throwaway local PostgreSQL clusters for tests, bench and demo.
- `demo`: `replicator demo`, the whole product on local clusters.
"""
