#!/usr/bin/env python3
"""Capture raw pgoutput messages from PostgreSQL 15 and 18 for the decoder's unit tests.

Not a test: run it by hand when the workload or the server versions change,
then commit the regenerated files:

    .venv/bin/python tools/capture_pgoutput.py

Each capture has its own logical slot, created before the workload, so all of
them decode the same transactions with different options. Files:
tests/unit/data/pgoutput_<server major>_v<proto>_<text|binary>[_stream].json,
holding {"meta": {...}, "messages": [{"lsn", "xid", "hex"}, ...]}, one message
per line. The messages are read with pg_logical_slot_peek_binary_changes(),
whose rows are exactly the CopyData payloads a walsender would send after the
'w' XLogData header.

`--odoo` captures something else, for bench/test_decoder_bench.py: the six Odoo tables
(replicator.devtools.seed), the devtools OLTP workload and a month-end-close-like bulk
insert and update of journal items, on PostgreSQL 15 with the options the replicator
itself asks for there (protocol 3, binary, messages), into
bench/data/pgoutput_15_v3_binary_odoo.json.gz (gzipped: the rows are wide):

    .venv/bin/python tools/capture_pgoutput.py --odoo
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run as a script, also without `pip install -e .`

from replicator.devtools.localpg import LocalCluster  # noqa: E402
from replicator.devtools.odoo import column_names  # noqa: E402
from replicator.devtools.seed import seed  # noqa: E402
from replicator.devtools.workload import workload as odoo_load  # noqa: E402
from replicator.source.connection import protocol_for  # noqa: E402

DATA_DIR = REPO_ROOT / "tests" / "unit" / "data"
BENCH_DATA_DIR = REPO_ROOT / "bench" / "data"
ODOO_FILE = "pgoutput_15_v3_binary_odoo.json.gz"
PUBLICATION = "pub"

# Rows per bulk transaction. On 15, enough to pass logical_decoding_work_mem =
# 64kB (its minimum) so that the server streams them in more than one chunk.
# On 18, debug_logical_replication_streaming = immediate streams every change
# anyway (an S/E pair around each one), so a few rows keep that file small.
BULK_ROWS = {15: 450, 18: 30}

SCHEMA = [
    "CREATE TYPE move_state AS ENUM ('draft', 'posted', 'cancel')",
    # Every column type the decoder must handle, in text and in binary.
    """CREATE TABLE wide (
        id int4 PRIMARY KEY,
        amount numeric(16, 2),
        code varchar(32),
        note text,
        data jsonb,
        active bool,
        day date,
        at timestamp,
        blob bytea,
        nums int4[],
        tags text[]
    )""",
    # Old rows come whole ('O') with REPLICA IDENTITY FULL.
    "CREATE TABLE full_ident (a int4, b text, c numeric)",
    "ALTER TABLE full_ident REPLICA IDENTITY FULL",
    # A composite key, and a user-defined type column: its first use sends a Type ('Y').
    """CREATE TABLE composite (
        company_id int4,
        code text,
        qty int4,
        state move_state,
        PRIMARY KEY (company_id, code)
    )""",
    "CREATE TABLE bulk (id int4 PRIMARY KEY, payload text)",
    f"CREATE PUBLICATION {PUBLICATION} FOR TABLE wide, full_ident, composite, bulk",
]


def workload(bulk_rows: int) -> list[tuple[int, str]]:
    """(session, statement) pairs, run in autocommit mode on session 1 or 2.

    BEGIN/COMMIT/ROLLBACK and savepoints are explicit, so the list reads as the
    transactions it makes; session 2 only serves to interleave two transactions.
    """
    return [(1, s) if isinstance(s, str) else s for s in _workload(bulk_rows)]


def _workload(bulk_rows: int) -> list[str | tuple[int, str]]:
    return [
        # insert: a row with every column set, a row of NULLs, a row with a value
        # big enough (and random enough not to compress) to be stored out of line.
        """INSERT INTO wide VALUES
            (1, 1234.50, 'A-1', 'héllo', '{"k": [1, "x"], "n": null}', true, '2024-01-31',
             '2024-01-31 12:34:56.789', '\\xdeadbeef', '{1,2,NULL}', '{"a","b c",NULL}'),
            (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)""",
        "INSERT INTO wide (id, code, note) SELECT 3, 'toast', string_agg(md5(g::text), '') FROM generate_series(1, 200) g",
        # update of non-key columns
        "UPDATE wide SET amount = amount + 1, code = 'A-1b', active = false WHERE id = 1",
        # update that changes the primary key: the old key comes as 'K'
        "UPDATE wide SET id = 10 WHERE id = 1",
        # update that leaves the out-of-line value alone: it comes as unchanged TOAST ('u')
        "UPDATE wide SET code = 'toast-2' WHERE id = 3",
        # delete: the old key comes as 'K'
        "DELETE FROM wide WHERE id = 2",
        # REPLICA IDENTITY FULL: old rows as 'O'
        "INSERT INTO full_ident VALUES (1, 'x', 1.5), (2, 'y', NULL)",
        "UPDATE full_ident SET b = 'x2' WHERE a = 1",
        "DELETE FROM full_ident WHERE a = 2",
        # composite key: insert, update, key change, delete in one transaction
        "BEGIN",
        "INSERT INTO composite VALUES (1, 'A', 5, 'draft'), (2, 'B', 6, 'posted')",
        "UPDATE composite SET qty = 7, state = 'posted' WHERE company_id = 1 AND code = 'A'",
        "UPDATE composite SET code = 'C' WHERE company_id = 2 AND code = 'B'",
        "DELETE FROM composite WHERE company_id = 1 AND code = 'A'",
        "COMMIT",
        # a new column: the next change is preceded by a new Relation message
        "ALTER TABLE composite ADD COLUMN note text",
        "INSERT INTO composite VALUES (3, 'D', 1, 'cancel', 'after alter')",
        # truncate: one table, then two tables with options
        "TRUNCATE composite",
        "TRUNCATE full_ident, composite RESTART IDENTITY CASCADE",
        # logical messages: transactional ones travel inside their transaction,
        # non-transactional ones arrive at once (even from a transaction that aborts)
        "BEGIN",
        "INSERT INTO wide (id, code) VALUES (4, 'with-message')",
        "SELECT pg_logical_emit_message(true, 'odoo-replicator', 'transactional hello')",
        "SELECT pg_logical_emit_message(false, 'odoo-replicator', '\\x00ff'::bytea)",
        "COMMIT",
        "SELECT pg_logical_emit_message(false, 'odoo-replicator', 'standalone')",
        "SELECT pg_logical_emit_message(true, 'odoo-replicator', 'transactional, alone')",
        # a rolled-back transaction: nothing arrives unless it was streamed
        "BEGIN",
        "INSERT INTO wide (id, code) VALUES (100, 'rolled back')",
        "ROLLBACK",
        # a savepoint rolled back: the subtransaction's rows vanish, the rest commits
        "BEGIN",
        "INSERT INTO wide (id, code) VALUES (20, 'kept')",
        "SAVEPOINT s1",
        "INSERT INTO wide (id, code) VALUES (21, 'rolled back to s1')",
        "ROLLBACK TO SAVEPOINT s1",
        "INSERT INTO wide (id, code) VALUES (22, 'kept too')",
        "COMMIT",
        # two transactions interleaved; the one that began later commits first.
        # Unstreamed they arrive one after the other in commit order; streamed,
        # their chunks interleave.
        (1, "BEGIN"),
        (2, "BEGIN"),
        (1, "INSERT INTO wide (id, code) VALUES (30, 'session 1, first')"),
        (2, "INSERT INTO wide (id, code) VALUES (40, 'session 2, first')"),
        (1, "INSERT INTO composite VALUES (5, 'E', 1, 'draft')"),
        (2, "INSERT INTO wide (id, code) VALUES (41, 'session 2, second')"),
        (2, "COMMIT"),
        (1, "INSERT INTO wide (id, code) VALUES (31, 'session 1, second')"),
        (1, "COMMIT"),
        # a large transaction: streamed (Stream Start/Stop, then Stream Commit)
        "BEGIN",
        f"INSERT INTO bulk SELECT g, md5(g::text) FROM generate_series(1, {bulk_rows}) g",
        "UPDATE bulk SET payload = 'updated' WHERE id <= 5",
        "COMMIT",
        # a large transaction with a large rolled-back subtransaction: Stream Abort
        # of the subtransaction (subxid != xid), then Stream Commit
        "BEGIN",
        "INSERT INTO bulk VALUES (100001, 'before savepoint')",
        "SAVEPOINT big",
        f"INSERT INTO bulk SELECT 200000 + g, md5(g::text) FROM generate_series(1, {bulk_rows}) g",
        "ROLLBACK TO SAVEPOINT big",
        "INSERT INTO bulk VALUES (100002, 'after savepoint')",
        "COMMIT",
        # a large transaction rolled back: Stream Abort of the whole transaction
        "BEGIN",
        f"INSERT INTO bulk SELECT 300000 + g, md5(g::text) FROM generate_series(1, {bulk_rows}) g",
        "ROLLBACK",
    ]


@dataclass(frozen=True)
class Capture:
    proto: int
    binary: bool
    streaming: str | None  # the option's value; None leaves it unset (off)

    @property
    def slot(self) -> str:
        return f"cap_v{self.proto}_{'binary' if self.binary else 'text'}_{self.streaming or 'nostream'}"

    def filename(self, version: int) -> str:
        kind = "binary" if self.binary else "text"
        stream = "_stream" if self.streaming else ""
        return f"pgoutput_{version}_v{self.proto}_{kind}{stream}.json"

    def options(self) -> list[str]:
        opts = {
            "proto_version": str(self.proto),
            "publication_names": PUBLICATION,
            "binary": "true" if self.binary else "false",
            "messages": "true",
        }
        if self.streaming:
            opts["streaming"] = self.streaming
        return [x for kv in opts.items() for x in kv]


# PostgreSQL 15: streaming is a Boolean and needs protocol 2+; its minimum
# logical_decoding_work_mem makes the bulk transactions stream, while the small
# ones still come as Begin/Commit (the mix a real source sends).
# PostgreSQL 18: streaming 'parallel' needs protocol 4 (and adds the abort LSN
# and time to Stream Abort); immediate streaming sends every transaction in
# chunks of one change, so chunks of concurrent transactions interleave.
CLUSTER_SETTINGS = {
    15: {"logical_decoding_work_mem": "64kB"},
    18: {"debug_logical_replication_streaming": "immediate"},
}
CAPTURES = {
    15: [
        Capture(1, False, None),
        Capture(3, True, "true"),
    ],
    18: [
        Capture(1, False, None),
        Capture(2, True, "on"),
        Capture(4, True, "parallel"),
    ],
}


def run_workload(cluster: LocalCluster, dbname: str, statements: list[tuple[int, str]]) -> None:
    sessions = {n: cluster.connect(dbname) for n in sorted({n for n, _ in statements})}
    try:
        for n, stmt in statements:
            sessions[n].execute(stmt)
        # An abort record is written but not flushed, and the decoding functions
        # read only flushed WAL: without this the last rolled-back transaction is
        # missing from the capture.
        conn = sessions[1]
        target = conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()[0]
        while not conn.execute("SELECT pg_current_wal_flush_lsn() >= %s::pg_lsn", (target,)).fetchone()[0]:
            time.sleep(0.05)
    finally:
        for conn in sessions.values():
            conn.close()


def capture_version(version: int, base_dir: Path) -> dict[str, dict]:
    results = {}
    statements = workload(BULK_ROWS[version])
    with LocalCluster(version, base_dir, settings=CLUSTER_SETTINGS[version]) as cluster:
        cluster.create_database("capture")
        with cluster.connect("capture") as conn:
            for stmt in SCHEMA:
                conn.execute(stmt)
            for cap in CAPTURES[version]:
                conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (cap.slot,))
        run_workload(cluster, "capture", statements)

        with cluster.connect("capture") as conn:
            server_version = conn.execute("SHOW server_version").fetchone()[0]
            server_version_num = int(conn.execute("SHOW server_version_num").fetchone()[0])
            settings = {
                name: conn.execute("SELECT current_setting(%s)", (name,)).fetchone()[0]
                for name in ("logical_decoding_work_mem", *CLUSTER_SETTINGS[version])
            }
            for cap in CAPTURES[version]:
                opts = cap.options()
                placeholders = ", ".join(["%s"] * len(opts))
                rows = conn.execute(
                    f"SELECT lsn::text, xid::text::bigint, data"
                    f" FROM pg_logical_slot_peek_binary_changes(%s, NULL, NULL, {placeholders})",
                    [cap.slot, *opts],
                ).fetchall()
                results[cap.filename(version)] = {
                    "meta": {
                        "server_version": server_version,
                        "server_version_num": server_version_num,
                        "slot_options": dict(zip(opts[::2], opts[1::2], strict=True)),
                        "settings": settings,
                        "schema_sql": SCHEMA,
                        "workload_sql": [{"session": n, "sql": stmt} for n, stmt in statements],
                        "note": "rows of pg_logical_slot_peek_binary_changes(); "
                        "hex is one pgoutput message, starting with its type byte",
                    },
                    "messages": [
                        {"lsn": lsn, "xid": xid, "hex": bytes(data).hex()} for lsn, xid, data in rows
                    ],
                }
    return results


def odoo_workload(bulk_rows: int) -> list[str]:
    """The month-end close, small: a bulk insert of journal items, then their posting."""
    cols = ", ".join(c for c in column_names("account_move_line") if c != "id")
    return [
        "BEGIN",
        f"INSERT INTO account_move_line ({cols}) SELECT {cols} FROM account_move_line"
        f" ORDER BY id LIMIT {bulk_rows}",
        "COMMIT",
        "BEGIN",
        "UPDATE account_move_line SET parent_state = 'posted',"
        " write_date = now() at time zone 'utc'"
        f" WHERE id > (SELECT max(id) - {bulk_rows} FROM account_move_line)",
        "COMMIT",
    ]


def capture_odoo(base_dir: Path, scale: float, transactions: int, bulk_rows: int) -> dict:
    """The six Odoo tables under the devtools workload, as the replicator receives them."""
    cap = Capture(protocol_for(150000), True, None)
    with LocalCluster(15, base_dir) as cluster:
        cluster.create_database("capture")
        dsn = cluster.dsn("capture")
        seed(dsn, scale=scale, seed=42, publication=PUBLICATION)
        with cluster.connect("capture") as conn:
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (cap.slot,))
        counts = odoo_load(dsn, transactions=transactions, seed=7)
        bulk = odoo_workload(bulk_rows)
        run_workload(cluster, "capture", [(1, stmt) for stmt in bulk])
        with cluster.connect("capture") as conn:
            server_version = conn.execute("SHOW server_version").fetchone()[0]
            opts = cap.options()
            placeholders = ", ".join(["%s"] * len(opts))
            rows = conn.execute(
                f"SELECT lsn::text, xid::text::bigint, data"
                f" FROM pg_logical_slot_peek_binary_changes(%s, NULL, NULL, {placeholders})",
                [cap.slot, *opts],
            ).fetchall()
    return {
        "meta": {
            "server_version": server_version,
            "slot_options": dict(zip(opts[::2], opts[1::2], strict=True)),
            "schema": "replicator.devtools.seed, scale %g, seed 42" % scale,
            "workload": f"replicator.devtools.workload, {transactions} transactions, seed 7 "
            f"({counts.get('transactions', 0)} committed), then {bulk_rows} journal items "
            "inserted in one transaction and updated in another",
            "workload_sql": bulk,
            "note": "rows of pg_logical_slot_peek_binary_changes(); "
            "hex is one pgoutput message, starting with its type byte",
        },
        "messages": [{"lsn": lsn, "xid": xid, "hex": bytes(data).hex()} for lsn, xid, data in rows],
    }


def write_capture(path: Path, capture: dict) -> None:
    # One message per line: reviewable diffs, and a file a person can grep.
    lines = ['{"meta": ' + json.dumps(capture["meta"], indent=1, ensure_ascii=False) + ",", ' "messages": [']
    messages = [json.dumps(m) for m in capture["messages"]]
    lines.append(",\n".join("  " + m for m in messages))
    lines.append(" ]\n}")
    text = "\n".join(lines) + "\n"
    if path.suffix == ".gz":
        # mtime=0: the same capture gives the same bytes
        path.write_bytes(gzip.compress(text.encode(), mtime=0))
    else:
        path.write_text(text)


def summary(capture: dict) -> str:
    kinds = collections.Counter(bytes.fromhex(m["hex"][:2]).decode() for m in capture["messages"])
    return " ".join(f"{k}={kinds[k]}" for k in sorted(kinds))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DATA_DIR, help="output directory (%(default)s)")
    parser.add_argument("--versions", type=int, nargs="+", default=sorted(CAPTURES))
    parser.add_argument("--odoo", action="store_true",
                        help=f"capture the six Odoo tables instead, into bench/data/{ODOO_FILE}")
    parser.add_argument("--odoo-scale", type=float, default=0.2, help="seed scale (--odoo)")
    parser.add_argument("--odoo-transactions", type=int, default=300,
                        help="workload transactions (--odoo)")
    parser.add_argument("--odoo-bulk-rows", type=int, default=1000,
                        help="rows of the bulk insert and update (--odoo)")
    args = parser.parse_args(argv)
    if args.odoo:
        out = args.out if args.out != DATA_DIR else BENCH_DATA_DIR
        out.mkdir(parents=True, exist_ok=True)
        base_dir = Path(tempfile.mkdtemp(prefix="odoo-replicator-capture-", dir="/tmp"))
        base_dir.chmod(0o755)
        try:
            capture = capture_odoo(base_dir, args.odoo_scale, args.odoo_transactions,
                                   args.odoo_bulk_rows)
        finally:
            shutil.rmtree(base_dir, ignore_errors=True)
        path = out / ODOO_FILE
        write_capture(path, capture)
        print(f"{path} {len(capture['messages'])} messages, {path.stat().st_size / 1024:.0f} kB:"
              f" {summary(capture)}")
        return 0

    args.out.mkdir(parents=True, exist_ok=True)
    # Not a private temp dir: as root the server runs as another user who must reach it.
    base_dir = Path(tempfile.mkdtemp(prefix="odoo-replicator-capture-", dir="/tmp"))
    base_dir.chmod(0o755)
    try:
        for version in args.versions:
            for filename, capture in capture_version(version, base_dir).items():
                path = args.out / filename
                write_capture(path, capture)
                size_kb = path.stat().st_size / 1024
                print(f"{path} {len(capture['messages'])} messages, {size_kb:.0f} kB: {summary(capture)}")
    finally:
        shutil.rmtree(base_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
