"""`replicator resync`: copy tables again while the rest streams, or every table at the next run.

It only writes the request into the destination's state (under the pipeline's lease: a
takeover in between refuses it); the running replicator starts the copy within seconds.
"""

from __future__ import annotations

import psycopg

from ..classify import classify
from ..config.settings import Config
from ..destination import lease, state
from ..errors import ErrorKind, ReplicatorError


def request(config: Config, tables: list[str], every: bool) -> str:
    """Mark the tables (or ``every`` table) for a new copy; what to tell the operator."""
    dst = config.destination
    slot = config.source.slot
    try:
        conn = psycopg.connect(dst.conninfo(), autocommit=True, prepare_threshold=None)
    except psycopg.Error as exc:
        raise classify(exc, settings=dst) from None
    with conn:
        if not state.exists(conn, dst.state_schema):
            # Nothing to copy again, and a refused request must leave nothing behind.
            raise ReplicatorError(
                ErrorKind.CONFIG, f"nothing to resync: no pipeline has run against this "
                f"destination yet (no state schema {dst.state_schema!r})",
                "the first `replicator run` copies every table")
        state.setup(conn, dst.state_schema)
        fence = lease.observe(conn, dst.state_schema, slot, "`replicator resync`")
        known = state.table_states(conn, dst.state_schema, slot)
        if every:
            with conn.transaction():
                fence.check(conn)
                state.forget_pipeline(conn, dst.state_schema, slot)
                count = state.request_resync(conn, dst.state_schema, slot, list(known))
            return (f"resync requested for every table ({count}): a running replicator "
                    "starts copying them within seconds, otherwise the next run does")
        names = state.named_tables(tables, known, slot)
        with conn.transaction():
            fence.check(conn)
            state.request_resync(conn, dst.state_schema, slot, names)
    return (f"resync requested for {', '.join(names)}: a running replicator starts it within "
            "seconds, otherwise the next run does")
