"""`replicator dead-letters`: list the changes set aside, and retry them once the mirror is fixed.

Exit 1 when a retried change still fails: what the command found, for scripts to branch on.
"""

from __future__ import annotations

import json

import psycopg

from ..classify import classify
from ..config.settings import Config
from ..destination import dead_letters as letters
from ..destination import lease, state
from ..errors import ConfigError, ExitCode
from ..telemetry.console import say


def run(config: Config, table: str | None, retry: bool, as_json: bool) -> int:
    dst = config.destination
    table = table if table is None or "." in table else f"{dst.schema}.{table}"
    try:
        conn = psycopg.connect(dst.conninfo(), autocommit=True, prepare_threshold=None)
    except psycopg.Error as exc:
        raise classify(exc, settings=dst) from None
    with conn:
        if not state.exists(conn, dst.state_schema):
            raise ConfigError(f"no replicator state in schema {dst.state_schema!r} of the "
                              "destination", "run `replicator run` first")
        state.setup(conn, dst.state_schema)
        if table is not None:
            known = {m for _st, _lsn, m in state.table_sync(
                conn, dst.state_schema, config.source.slot).values()}
            if table not in known:
                raise ConfigError(
                    f"--table: {table} is not a mirror table of pipeline "
                    f"{config.source.slot!r}",
                    "name a mirror table as `replicator status` lists it (schema.table, or "
                    "table for [destination] schema)")
        outcome = None
        if retry:
            fence = lease.observe(conn, dst.state_schema, config.source.slot,
                                  "`replicator dead-letters --retry`")
            outcome = letters.retry(conn, dst.state_schema, config.source.slot, table, fence,
                                    letters.mirror_options(config))
        left = letters.waiting(conn, dst.state_schema, config.source.slot, table)
    if as_json:
        doc: dict = {"dead_letters": [letter.as_dict() for letter in left]}
        if outcome is not None:
            doc["retry"] = {"applied": outcome.applied, "superseded": outcome.superseded,
                            "failed": len(outcome.failed),
                            "not_retryable": outcome.not_retryable}
        print(json.dumps(doc, default=str))
    else:
        if outcome is not None:
            say(f"retried: {outcome.applied} applied, {len(outcome.failed)} still failing, "
                f"{outcome.superseded} superseded by a later copy of their table, "
                f"{outcome.not_retryable} not retryable")
        say(f"{len(left)} dead letters" + (":" if left else ""))
        for letter in left:
            d = letter.as_dict()
            say(f"  #{d['id']} {d['table']} {d['op'] or '-'} key {letter.key} at {d['lsn']} "
                f"({d['created']}, retries {d['retries']}): "
                f"{d['reason']}" + (f" [{d['sqlstate']}]" if d["sqlstate"] else ""))
    return 1 if outcome is not None and outcome.failed else ExitCode.OK
