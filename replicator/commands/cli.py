"""The ``replicator`` command: init, run, check, resync, status, verify, dead-letters, drop,
seed, demo.

This is where errors become what an operator sees: a ReplicatorError is one line on stderr
(``error: <what, where> — <what to do>``) and its kind's exit code; anything else is a bug and
is logged with its traceback. Each command's work is in a module of its own; this one
parses, loads the configuration, sets up logging and prints.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import logging
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict

from ..classify import classify
from ..config.load import load_config
from ..config.settings import Config, LoggingSettings
from ..errors import ConfigError, ErrorKind, ExitCode, ReplicatorError
from ..pipeline import preflight, supervisor
from ..redact import redact, register_secret
from ..telemetry.console import printable, say
from ..telemetry.logs import setup_logging
from . import dead_letters, drop, init, resync, status, verify, verify_report

__all__ = ["build_parser", "main"]

log = logging.getLogger(__name__)

CONFIG_ENV = "REPLICATOR_CONFIG"
DEFAULT_CONFIG = "etl-config.toml"

_DESCRIPTION = """\
One-way change data capture from an Odoo PostgreSQL database (logical replication, pgoutput)
into a Supabase PostgreSQL mirror (schema odoo_mirror by default). Configured by
etl-config.toml, with secrets as $VARIABLES from the environment or a .env file beside it."""

_EPILOG = """\
examples:
  replicator check --config etl-config.toml   validate the configuration (run this first)
  replicator init --config etl-config.toml    set up the mirror: RLS, policy, views, grants
  replicator run --config etl-config.toml     replicate until stopped (Ctrl-C, SIGTERM)
  replicator run --until-caught-up            replicate up to the source's current position, exit
  replicator resync --table account_move      copy one table again while the rest streams
  replicator status --config etl-config.toml  slot, lag, tables, dead letters (exit 1: a problem)
  replicator dead-letters --retry             re-apply rejected changes once the mirror is fixed
  replicator verify --config etl-config.toml  compare mirror and source row by row (exit 1: drift)
  replicator drop --config etl-config.toml    remove the pipeline: its slot and state (--yes)
  replicator seed --dsn "dbname=odoo_core"    fill a database with Odoo-shaped test data
  replicator demo                             try it all on throwaway local servers

Each command has its own help: replicator COMMAND --help

exit codes:
  0    success
  1    internal error (a bug: the log has the traceback)
  2    something to fix: configuration, source database setup, or a resync is required
  3    a database stayed unreachable
  4    applying or decoding kept failing on the same data
  5    another replicator process holds the pipeline's lease
  130  interrupted"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the hand-wrapped descriptions and examples as written."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="replicator",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    run = commands.add_parser(
        "run",
        help="replicate changes from the source into the mirror",
        description=(
            "Replicate: create the mirror tables, copy the existing rows of tables not yet\n"
            "synchronised, then stream every committed change (insert, update, delete,\n"
            "truncate) from the publication into the mirror. Resumes where it stopped, with\n"
            "each source transaction applied exactly once. Stop with Ctrl-C or SIGTERM:\n"
            "the process exits within 9 s even while a connection is dead. A connection\n"
            "that goes silent is noticed ([source] receive_timeout, [destination]\n"
            "stall_timeout) and opened again; see docs/operations.md, Dead connections and\n"
            "recovery."
        ),
        epilog=(
            "examples:\n"
            "  replicator run --config /app/config.toml\n"
            "  replicator run --until-caught-up        # e.g. from cron, or before a report\n"
            "  REPLICATOR_CONFIG=/app/config.toml replicator run --log-level debug"
        ),
        formatter_class=_Formatter,
    )
    _add_config_option(run)
    run.add_argument(
        "--until-caught-up",
        action="store_true",
        help="stop (exit 0) once everything committed on the source before the start is "
        "applied, instead of running until stopped (secondary indexes of newly copied "
        "tables not built by then are left to the next run)",
    )
    run.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        help="override [logging] level for this run",
    )
    run.add_argument(
        "--metrics-host",
        metavar="ADDRESS",
        help="override [metrics] host, the address /metrics, /health and /ready listen on "
        "(default 127.0.0.1, this host only; the container image passes 0.0.0.0 so that "
        "Prometheus on its network can scrape it). They have no authentication: publish "
        "the port on a private interface only",
    )
    run.set_defaults(handler=_cmd_run)

    init = commands.add_parser(
        "init",
        help="set up the mirror in Supabase: schemas, RLS and policy, views, grants, triggers",
        description=(
            "Create or bring up to date the mirror's setup in Supabase, from SQL\n"
            "migrations shipped in the package (versions recorded in the state schema):\n"
            "  - the mirror and state schemas, and the mirror tables (empty, from the source\n"
            "    catalog: `run` copies them), so the views exist before the first copy;\n"
            "  - row-level security on every mirror table with the policy \"Analytics access\n"
            "    only\": FOR SELECT TO [destination] analytics_roles USING (true); SELECT for\n"
            "    those roles, writes for the replicator's role only. Tables `run` creates later\n"
            "    get the same;\n"
            "  - views v_invoice_summary, v_receivables_aging, v_open_tasks,\n"
            "    v_pending_expenses, the function get_pending_expenses() (n8n), and the\n"
            "    freshness view <state_schema>.freshness (\"data as of\" per table);\n"
            "  - with [destination] memory_triggers = true: the ipai_memory schema and the\n"
            "    invoice-to-memory trigger (fires once per streamed insert, never for the copy).\n"
            "An analytics role that does not exist is created NOLOGIN if this role may create\n"
            "roles; otherwise init stops and says so. Connects to the source (read-only) and\n"
            "the destination. Idempotent: a second run changes nothing. Safe while `run` runs."
        ),
        epilog=(
            "examples:\n"
            "  replicator init --config etl-config.toml\n"
            "  replicator init && replicator run      # first deployment"
        ),
        formatter_class=_Formatter,
    )
    _add_config_option(init)
    init.set_defaults(handler=_cmd_init)

    check = commands.add_parser(
        "check",
        help="validate the configuration and the databases' setup, change nothing",
        description=(
            "Load the configuration, resolve its $VARIABLES (environment, then .env beside\n"
            "the file), validate every setting, and print a summary without secrets.\n"
            "Where available, it also checks the source and destination setup (wal_level,\n"
            "publication, replica identities, privileges), and says whether a failover of\n"
            "the source would keep the slot (PostgreSQL 17+ failover slots; with [source]\n"
            "standby_host, the standby's synced copy). Nothing is changed."
        ),
        epilog="example:\n  replicator check --config etl-config.toml",
        formatter_class=_Formatter,
    )
    _add_config_option(check)
    check.set_defaults(handler=_cmd_check)

    resync = commands.add_parser(
        "resync",
        help="copy one table (or all) again from the source, while the rest keeps streaming",
        description=(
            "Mark tables for a new initial copy. A running replicator picks the request up\n"
            "within seconds: it holds the table's changes, copies it from a fresh snapshot\n"
            "into a shadow table, brings the mirror to that copy in one transaction, applies\n"
            "the held changes and streams it again; other tables keep streaming meanwhile.\n"
            "With no replicator running, the next `run` does the copy. Analysts see the old\n"
            "rows until the copy is complete, then the new ones; the table's views, policy\n"
            "and grants are untouched. The shadow needs room for a second copy of the table."
        ),
        epilog=(
            "examples:\n"
            "  replicator resync --config etl-config.toml --table account_move_line\n"
            "  replicator resync --config etl-config.toml --all   # after a lost slot"
        ),
        formatter_class=_Formatter,
    )
    _add_config_option(resync)
    which = resync.add_mutually_exclusive_group(required=True)
    which.add_argument("--table", action="append", metavar="NAME",
                       help="source table (schema.table, or table for schema public); repeatable")
    which.add_argument("--all", action="store_true",
                       help="every table, and forget the applied position: for a mirror that "
                       "lost changes (a dropped slot, a restored destination)")
    resync.set_defaults(handler=_cmd_resync)

    status = commands.add_parser(
        "status",
        help="is the mirror fresh and complete? slot, lag, table states, dead letters",
        description=(
            "Show the replication slot (exists, active, confirmed/restart LSN, wal_status,\n"
            "WAL it retains), the applied position and when it was written, the lag in bytes\n"
            "(source WAL position minus applied) and seconds (since the last applied write\n"
            "while behind), each table's sync state with source and mirror row counts, and\n"
            "the dead letters. Read-only, and never waits for a lock: safe beside `run`.\n"
            "Mirror rows are count(*) up to 100000 rows, the planner's estimate above.\n"
            "Says whether a replicator runs the pipeline: \"running\", \"standby\" (a second\n"
            "process taking over) or \"not running since T\" with the reason it stopped (its\n"
            "error, \"stopped on request\", or none recorded: killed), and whether a failover\n"
            "of the source would keep the slot (one `failover` line).\n"
            "Exit 0 when all is well; 1 when no replicator runs it, when the slot is missing\n"
            "or lost while the state says the mirror was synced, or when the lag exceeds\n"
            "--max-lag-seconds; 2 (or 3 for an unreachable database) when it cannot tell,\n"
            "with one line on stderr."
        ),
        epilog=(
            "examples:\n"
            "  replicator status --config etl-config.toml\n"
            "  replicator status --json --max-lag-seconds 60   # for scripts and monitoring"
        ),
        formatter_class=_Formatter,
    )
    _add_config_option(status)
    status.add_argument("--json", action="store_true",
                        help="print one JSON object instead of the table")
    status.add_argument("--max-lag-seconds", type=float, default=300.0, metavar="S",
                        help="exit 1 when the mirror is more than S seconds behind "
                        "(default: %(default)g)")
    status.set_defaults(handler=_cmd_status)

    dropper = commands.add_parser(
        "drop",
        help="remove the pipeline: its replication slot on the source and its state",
        description=(
            "Remove what the pipeline of this config made: its replication slot on the\n"
            "source (which otherwise keeps WAL there for ever) and its rows in the state\n"
            "schema (applied position, table states, dead letters, lease). The mirror tables\n"
            "stay, and analysts keep reading them, unless --mirror drops them too (a view\n"
            "over one is never dropped with it: drop those yourself first). The publication\n"
            "is yours and stays. Without --yes nothing is removed: it says what would be.\n"
            "Refused while a replicator runs this pipeline: stop it first. A `run` after a\n"
            "drop starts a new pipeline: a new slot and a copy of every table.\n"
            "Exit 0 when removed (or nothing was there); 2 without --yes."
        ),
        epilog=(
            "examples:\n"
            "  replicator drop --config etl-config.toml           # what would be removed\n"
            "  replicator drop --config etl-config.toml --yes\n"
            "  replicator drop --config etl-config.toml --yes --mirror"
        ),
        formatter_class=_Formatter,
    )
    _add_config_option(dropper)
    dropper.add_argument("--yes", action="store_true",
                         help="remove it (without: only say what would be removed)")
    dropper.add_argument("--mirror", action="store_true",
                         help="drop the mirror tables too (and their change histories)")
    dropper.set_defaults(handler=_cmd_drop)

    letters = commands.add_parser(
        "dead-letters",
        help="list the changes the mirror rejected; --retry applies them again",
        description=(
            "List the dead letters: changes the mirror rejected ([destination] on_error =\n"
            "\"dead_letter\": a constraint added on the mirror, a value out of range after a\n"
            "manual type change) and rows whose unchanged TOAST values nothing could supply.\n"
            "While a key has a waiting letter, its later changes wait behind it, in order.\n"
            "\n"
            "--retry applies them again once the mirror is fixed, in order, one key at a time\n"
            "in one transaction: a key's letters all go in (and are deleted) or none do, and\n"
            "the failing one gets the new error. A letter older than its table's last copy is\n"
            "deleted (the copy holds it); a TOAST letter is not retried (resync the table).\n"
            "Safe beside a running `replicator run`: batches wait while the retry runs.\n"
            "Exit 0; with --retry, 1 when some letters still fail."
        ),
        epilog=(
            "examples:\n"
            "  replicator dead-letters --config etl-config.toml\n"
            "  replicator dead-letters --table odoo_mirror.res_partner --json\n"
            "  replicator dead-letters --retry"
        ),
        formatter_class=_Formatter,
    )
    _add_config_option(letters)
    letters.add_argument("--table", metavar="NAME",
                         help="only this mirror table (schema.table, or table for [destination] "
                         "schema)")
    letters.add_argument("--json", action="store_true",
                         help="print one JSON object instead of the table")
    letters.add_argument("--retry", action="store_true",
                         help="apply the waiting letters again (after fixing the mirror)")
    letters.set_defaults(handler=_cmd_dead_letters)
    verify = commands.add_parser(
        "verify",
        help="compare the mirror with the source, row by row: exit 1 on drift",
        description=(
            "Compare each streaming (or copied) table's mirror with its source table: row\n"
            "counts and row hashes over ranges of the primary key (about 10000 rows each),\n"
            "computed by the servers; a range that differs is narrowed down to its keys,\n"
            "reported as changed, missing in the mirror or extra in the mirror.\n"
            "\n"
            "Safe beside a running `run` under load: the source is read in a read-only\n"
            "snapshot (plain SELECTs: writers are never blocked) and the mirror only once\n"
            "it has applied past that snapshot's WAL position; each differing key is read\n"
            "again on both sides in fresh snapshots, and only a difference that stays the\n"
            "same from one round to the next is drift. A key that keeps changing through\n"
            "every round is reported as still changing, not as drift. With `run` stopped,\n"
            "the mirror counts as caught up when its slot holds no change it has not\n"
            "applied (a peek at the slot, which consumes nothing). Columns only one side\n"
            "has (a column dropped at the source, one not replicated yet) are left out.\n"
            "\n"
            "Exit 0: no drift (skipped tables are listed with the reason); 1: drift, with\n"
            "the table, key range and keys; 2: cannot verify (configuration, unknown\n"
            "--table, or the mirror did not catch up with the source within --wait);\n"
            "3: a database is unreachable. No data is written unless --repair is given (on\n"
            "an idle source, one logical message lets the applied position move).\n"
            "\n"
            "--repair re-copies only the drifted keys: in one destination transaction that\n"
            "holds the pipeline's row (no batch commits meanwhile), it reads those rows from\n"
            "a source snapshot taken after the lock, which has every change the mirror has,\n"
            "and writes them; the stream then goes on from where the mirror was, so no older\n"
            "value ever overwrites a newer one. A key that changed since it was verified is\n"
            "left alone. The tables repaired are verified again: exit 0 when they are now\n"
            "clean. For a table with much drift, `replicator resync --table NAME` instead."
        ),
        epilog=(
            "examples:\n"
            "  replicator verify --config etl-config.toml\n"
            "  replicator verify --table account_move --json   # for scripts and monitoring\n"
            "  replicator verify --repair                       # re-copy what drifted"
        ),
        formatter_class=_Formatter,
    )
    _add_config_option(verify)
    verify.add_argument("--table", action="append", metavar="NAME",
                        help="source table (schema.table, or table for schema public); "
                        "repeatable; default: every replicated table")
    verify.add_argument("--json", action="store_true",
                        help="print one JSON object instead of the table, with every drifted key "
                        "found (the text lists 20 per table)")
    verify.add_argument("--repair", action="store_true",
                        help="re-copy the drifted keys from the source, in the stream's order "
                        "(the pipeline is held for the few writes), then verify those tables "
                        "again")
    verify.add_argument("--wait", type=float, default=60.0, metavar="S",
                        help="how long to wait for the mirror to apply what a source snapshot "
                        "shows before giving up with exit 2 (default: %(default)g)")
    verify.set_defaults(handler=_cmd_verify)

    seed = commands.add_parser(
        "seed",
        help="fill a database with Odoo-shaped test data",
        description=(
            "Create Odoo-shaped tables (account_move, account_move_line, res_partner,\n"
            "project_task, hr_expense, hr_expense_sheet) in a database and fill them with\n"
            "generated data; the same --seed gives the same data. For tests, benchmarks and\n"
            "demos: never point it at a production database. It also creates the publication\n"
            "(--publication, FOR TABLE the six) unless one of that name exists, and says so."
        ),
        epilog=(
            "examples:\n"
            '  PGPASSWORD=... replicator seed --dsn "host=127.0.0.1 dbname=odoo_core user=odoo"\n'
            '  replicator seed --dsn "postgresql://odoo@127.0.0.1/odoo_core" --scale 10'
        ),
        formatter_class=_Formatter,
    )
    seed.add_argument(
        "--dsn",
        required=True,
        help="libpq connection string or URI of the database to fill, without the password: "
        "anyone on this machine can read a command line (ps), so give the password in "
        "PGPASSWORD or ~/.pgpass, which libpq reads (a password in --dsn still works, with "
        "a warning; it is never printed)",
    )
    seed.add_argument(
        "--scale",
        type=_positive_int,
        default=1,
        metavar="N",
        help="data volume multiplier (default: %(default)s)",
    )
    seed.add_argument(
        "--seed",
        type=int,
        default=42,
        metavar="S",
        help="random seed: the same seed gives the same data (default: %(default)s)",
    )
    seed.add_argument(
        "--publication",
        default="odoo_pub_scout",
        metavar="NAME",
        help="the publication to create for the six tables (default: %(default)s); "
        "--publication '' creates none",
    )
    seed.set_defaults(handler=_cmd_seed)

    demo = commands.add_parser(
        "demo",
        help="see it work: throwaway servers, seeded data, live replication",
        description=(
            "Start a throwaway source and destination PostgreSQL, seed Odoo-shaped data, run\n"
            "`init` (schemas, row-level security, views), copy the existing rows, show\n"
            "`status`, stream Odoo-like changes while they are made, and show with `verify`\n"
            "and a table-by-table comparison that the mirror equals the source. Prints where\n"
            "the metrics are. Needs no configuration and touches no existing database;\n"
            "--keep leaves the servers up with the commands to use and stop them."
        ),
        epilog="examples:\n  replicator demo --workdir /tmp/replicator-demo --scale 2\n"
               "  replicator demo --keep          # then explore the servers yourself",
        formatter_class=_Formatter,
    )
    demo.add_argument(
        "--workdir",
        type=Path,
        metavar="DIR",
        help="directory for the servers' data and logs (default: a new temporary directory)",
    )
    demo.add_argument(
        "--scale",
        type=_positive_int,
        default=1,
        metavar="N",
        help="data volume multiplier (default: %(default)s)",
    )
    demo.add_argument(
        "--keep",
        action="store_true",
        help="leave the servers running afterwards and print how to connect, query the "
        "views, run the replicator against them and stop them",
    )
    demo.add_argument(
        "--seconds",
        type=float,
        default=10.0,
        metavar="S",
        help="how long the Odoo-like workload writes while streaming (default: %(default)g)",
    )
    demo.add_argument(
        "--port",
        type=_positive_int,
        metavar="N",
        help="the port of the replicator's metrics and /health (default: a free one)",
    )
    demo.set_defaults(handler=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code (see ``replicator --help``)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors; main() returns, not exits
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if args.command is None:
        parser.print_help(sys.stderr)
        return ExitCode.FATAL

    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
    except ReplicatorError as err:
        return _report(err)
    except psycopg.Error as exc:
        # A database error nobody classified (seed and demo talk to databases directly):
        # still an operator problem unless classify() says it is ours.
        classified = classify(exc)
        if classified.kind is ErrorKind.INTERNAL:
            _log_bug(exc)
            return ExitCode.INTERNAL
        return _report(classified)
    except Exception as exc:
        _log_bug(exc)
        return ExitCode.INTERNAL


def _report(err: ReplicatorError) -> int:
    # Not a traceback: the operator needs what is wrong and what to do, nothing else.
    print(f"error: {printable(redact(err.one_line()))}", file=sys.stderr)
    return int(err.exit_code)


# --- commands -------------------------------------------------------------------------------


def _cmd_run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    settings = config.logging
    if args.log_level:
        settings = dataclasses.replace(settings, level=args.log_level)
    if args.metrics_host is not None:
        config = dataclasses.replace(config, metrics=dataclasses.replace(
            config.metrics, host=args.metrics_host))
    setup_logging(settings)
    for line in _no_effect(config):
        log.warning(line)
    log.info(
        "config loaded",
        extra={
            "config": str(config.path),
            "source": config.source.describe(),
            "destination": config.destination.describe(),
            "until_caught_up": args.until_caught_up,
        },
    )
    return int(supervisor.run(config, until_caught_up=args.until_caught_up))


def _cmd_init(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    _setup_console_logging()
    init.init(config)
    return ExitCode.OK


def _cmd_check(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    _setup_console_logging()
    say(_summary(config))
    for warning in _tls_warnings(config) + _no_effect(config):
        say(f"warning: {warning}", file=sys.stderr)
    sys.stdout.flush()  # the summary first, then whatever the deeper checks report
    result = preflight.check(config)
    return ExitCode.OK if result is None else int(result)


def _cmd_resync(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    _setup_console_logging()
    say(resync.request(config, args.table, args.all))
    return ExitCode.OK


def _cmd_status(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    _setup_console_logging()
    st = status.collect(config, args.max_lag_seconds)
    if args.json:
        print(json.dumps(st.as_dict(), indent=None))
    else:
        say(status.render(st))
    # Not an error of this command: what it found, for scripts and monitors to branch on.
    return 1 if st.problems else ExitCode.OK


def _cmd_drop(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    _setup_console_logging()
    slot = config.source.slot
    if not args.yes:
        found = drop.describe(drop.plan(config), args.mirror)
        if not found:
            say(f"pipeline {slot}: nothing to remove (no slot {slot} on the source, no state)")
            return ExitCode.OK
        say(printable(f"pipeline {slot}: `drop --yes` would remove\n"
                      + "".join(f"  - {line}\n" for line in found)
                      + ("" if args.mirror else "the mirror tables stay (--mirror drops them)\n")
                      + f"the publication {config.source.publication} stays"))
        say("nothing was removed: run it again with --yes", file=sys.stderr)
        return ExitCode.FATAL
    removed = drop.drop(config, args.mirror)
    if not removed:
        say(f"pipeline {slot}: nothing to remove (no slot {slot} on the source, no state)")
        return ExitCode.OK
    say(printable(f"pipeline {slot}: removed\n" + "".join(f"  - {line}\n" for line in removed)
                  + ("" if args.mirror else "the mirror tables stay (--mirror drops them); ")
                  + "a `run` now starts a new pipeline: a new slot, every table copied again"))
    return ExitCode.OK


def _cmd_dead_letters(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    _setup_console_logging()
    return dead_letters.run(config, args.table, args.retry, args.json)


def _cmd_verify(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    _setup_console_logging()
    report = verify.verify(config, args.table, args.wait, repair=args.repair)
    if args.json:
        print(json.dumps(report.as_dict(), indent=None))
    else:
        say(verify_report.render(report))
    # What it found, not an error of the command: scripts branch on it.
    return 1 if report.drift else ExitCode.OK


def _cmd_seed(args: argparse.Namespace) -> int:
    try:
        params = conninfo_to_dict(args.dsn)
    except psycopg.ProgrammingError as exc:
        raise ConfigError(
            f"--dsn: {_dsn_problem(str(exc), args.dsn)} (the string is not repeated here: it "
            "may hold a password)",
            'pass "host=... dbname=... user=..." (quote a value with spaces in single quotes) '
            "or postgresql://user@host/dbname (a % in it written %25), and the password in "
            "PGPASSWORD") from None
    register_secret(params.get("password"))
    if params.get("password"):
        say("warning: the --dsn password is visible to every user of this machine in the "
             "process list (ps): leave it out of --dsn and set PGPASSWORD (or ~/.pgpass), "
             "which libpq reads", file=sys.stderr)
    _setup_console_logging()
    # Dev tooling, imported only here: `replicator run` never loads the generator.
    from ..devtools import seed as seed_module
    publication = args.publication or None
    existed = publication is not None and seed_module.publication_exists(args.dsn, publication)
    rows = seed_module.seed(args.dsn, scale=args.scale, seed=args.seed, publication=publication)
    if isinstance(rows, Mapping):  # rows per table
        say("seeded: " + ", ".join(f"{table} {count}" for table, count in rows.items()))
    if publication is not None:
        tables = ", ".join(rows) if isinstance(rows, Mapping) else "the six tables"
        say(printable(f"publication {publication}: " + (
            "exists already, left as it is" if existed else
            f"created FOR TABLE {tables} (so skip `create publication` for it)")))
    return ExitCode.OK


def _cmd_demo(args: argparse.Namespace) -> int:
    _setup_console_logging()
    # Dev tooling, imported only here (its test servers and workload).
    from ..devtools import demo as demo_module
    result = demo_module.main(args.workdir, args.scale, keep=args.keep, seconds=args.seconds,
                              metrics_port=args.port)
    return ExitCode.OK if result is None else int(result)


# --- helpers --------------------------------------------------------------------------------


def _dsn_problem(message: str, dsn: str) -> str:
    """libpq's reason for refusing ``dsn``, without the pieces of it the reason quotes.

    libpq quotes what it could not parse ("invalid percent-encoded token: "<password>"") and
    the error comes before the password could be registered for redaction. Quoted text is
    dropped; a reason that still holds a piece of the string (a translation quoting it some
    other way) is left out.
    """
    reason = " ".join(message.split())
    reason = re.sub(r'"([^"]*)"', lambda m: m.group(0) if m.group(1) == "=" else '"…"', reason)
    pieces = {p for p in re.split(r"[\s=:@/?&'\"]+", dsn) if len(p) >= 3}
    if not reason or any(piece in reason for piece in pieces):
        return "not a valid connection string or URI"
    return reason


def _add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c",
        "--config",
        type=Path,
        default=Path(os.environ.get(CONFIG_ENV, DEFAULT_CONFIG)),
        metavar="PATH",
        help=f"the etl-config.toml to use (default: ${CONFIG_ENV}, else ./{DEFAULT_CONFIG}); "
        "$VARIABLES in it are read from the environment, then from .env beside it",
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _setup_console_logging() -> None:
    # Commands run by a person: readable lines on stderr, leaving stdout to the command.
    setup_logging(LoggingSettings(level="info", format="text", output="stderr"))


def _log_bug(exc: BaseException) -> None:
    root = logging.getLogger()
    if not any(getattr(h, "_replicator_handler", False) for h in root.handlers):
        _setup_console_logging()
    log.error(
        "internal error (a bug, please report it): %s: %s",
        type(exc).__name__,
        exc,
        exc_info=exc,
    )


def _summary(config: Config) -> str:
    src, dst = config.source, config.destination
    lines = [f"config OK: {config.path}" if config.path else "config OK"]
    lines.append(
        f"  source:      {src.describe()}  publication {src.publication}, slot {src.slot}"
        + (f"; password from {src.password_source}" if src.password_source else "")
    )
    lines.append(
        f"  destination: {dst.describe()}  schema {dst.schema}, state in {dst.state_schema}; "
        f"batches up to {dst.batch_size} rows, flushed within {dst.flush_interval:g} s"
        + (f"; password from {dst.password_source}" if dst.password_source else "")
    )
    lines.append(f"  tables:      every table of the publication -> {dst.schema}.<same name>")
    if config.mappings:
        pairs = ", ".join(f"{s} -> {d}{_mapping_options(config, s)}"
                          for s, d in config.mappings.items())
        lines.append(f"  mappings:    {len(config.mappings)} renamed or with options: {pairs}")
    lg = config.logging
    lines.append(f"  logging:     {lg.level}, {lg.format} -> {lg.output}")
    m = config.metrics
    metrics = f"port {m.port}, path {m.path}" if m.enabled else "off"
    lines.append(f"  metrics:     {metrics}")
    return redact("\n".join(lines))


# What each sslmode short of verifying the server lets through (libpq's documentation).
_WEAK_SSLMODES = {
    "disable": "sends everything unencrypted",
    "allow": "sends everything unencrypted unless the server insists on TLS",
    "prefer": "lets a machine in between turn encryption off, and accepts any certificate",
    "require": "encrypts but accepts any certificate, so a machine in between can pose as "
               "the server",
}


def _no_effect(config: Config) -> list[str]:
    return [f"{key} has no effect: the replicator holds each connection open for as long "
            "as it runs; remove it from the config" for key in config.ignored]


def _tls_warnings(config: Config) -> list[str]:
    """One line per side that reaches a server over a network without verifying it.

    A warning, not a new default: verify-full needs the server's CA certificate, and a
    default that refused every existing config without one would stop working deployments.
    """
    warnings = []
    for side in (config.source, config.destination):
        mode = side.sslmode or os.environ.get("PGSSLMODE") or "prefer"
        host = side.host or os.environ.get("PGHOST", "")
        if mode not in _WEAK_SSLMODES or _is_local_host(
                [h for h, _p in side.hosts] if side.host else host.split(",")):
            continue
        origin = ("" if side.sslmode else
                  " (from PGSSLMODE)" if os.environ.get("PGSSLMODE") else " (libpq's default)")
        where = f"[{side.section}]"
        ca = ("the Supabase CA certificate (dashboard: Database Settings > SSL Configuration > "
              "Download certificate)" if side.section == "destination"
              else "the CA certificate that signed the server's")
        warnings.append(
            f"{where} host {host} is reached over a network with sslmode \"{mode}\"{origin}, "
            f"which {_WEAK_SSLMODES[mode]}: set {where} sslmode = \"verify-full\" and "
            f"sslrootcert to {ca}")
    return warnings


def _is_local_host(names: list[str]) -> bool:
    """True when every host libpq would try is this machine: a Unix socket directory (what
    an empty host means too), localhost, or a loopback address."""
    for name in names:
        name = name.strip()
        if not name or name.startswith(("/", "@")) or name.lower() == "localhost":
            continue
        try:
            if ipaddress.ip_address(name).is_loopback:
                continue
        except ValueError:
            pass
        return False
    return True


def _mapping_options(config: Config, source: str) -> str:
    """" (exclude email, phone; filter; soft_delete; history)" for a table-form mapping."""
    opts = config.options(*source.split(".", 1))
    parts = ([f"exclude {', '.join(sorted(opts.exclude))}"] if opts.exclude else []) + [
        name for name, on in (("filter", opts.filter), ("soft_delete", opts.soft_delete),
                              ("history", opts.history)) if on]
    return f" ({'; '.join(parts)})" if parts else ""


def _version() -> str:
    # Lazy: only --version reads the installed metadata; `run` does not pay for it.
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("odoo-replicator")
    except PackageNotFoundError:
        return "unknown (not installed)"
