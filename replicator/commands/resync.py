"""`replicator resync`: copy tables again while the rest streams, or every table at the next run.

It only writes the request into the destination's state (under the pipeline's lease: a
takeover in between refuses it); the running replicator starts the copy within seconds.
"""

from __future__ import annotations

import psycopg

from ..classify import classify
from ..config.settings import Config
from ..destination import lease, state


def request(config: Config, tables: list[str], every: bool) -> str:
    """Mark the tables (or ``every`` table) for a new copy; what to tell the operator."""
    dst = config.destination
    slot = config.source.slot
    try:
        conn = psycopg.connect(dst.conninfo(), autocommit=True, prepare_threshold=None)
    except psycopg.Error as exc:
        raise classify(exc, settings=dst) from None
    with conn:
        state.setup(conn, dst.state_schema)
        fence = lease.observe(conn, dst.state_schema, slot, "`replicator resync`")
        known = state.table_states(conn, dst.state_schema, slot)
        if every:
            with conn.transaction():
                fence.check(conn)
                state.forget_pipeline(conn, dst.state_schema, slot)
                count = state.request_resync(conn, dst.state_schema, slot, list(known))
            return f"resync requested for every table ({count}); the next run copies them"
        names = state.named_tables(tables, known, slot)
        with conn.transaction():
            fence.check(conn)
            state.request_resync(conn, dst.state_schema, slot, names)
    return (f"resync requested for {', '.join(names)}: a running replicator starts it within "
            "seconds, otherwise the next run does")
