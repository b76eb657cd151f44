"""Memory of the running process for one huge value.

A huge text value (an attachment's body, a log kept in one field) arrives in one pgoutput
message, and libpq holds it twice whatever its client does: in its input buffer (which it
never shrinks) and in the copy PQgetCopyData returns. Past those two the process must not
copy it again: the decoder leaves a value of 1 MiB or more in that copy (a Span) and the
COPY to the destination reads it from there; a streamed transaction's rows are restaged in
place. Before, the value was held three times at once (331 MiB for 96 MB).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from plugins.replicator import MIRROR_SCHEMA, PUBLICATION, assert_same, wait_for
from plugins.servers import ONE_VERSION

# The copies are the replicator's and libpq's, whatever the source's version.
pytestmark = ONE_VERSION

# Half of README's 96 MB, for the suite's time: a third copy (48 MB more than the bound)
# still fails, and the ratio is what is measured (235 MiB for 96 MB, 43 before it).
VALUE_MB = 48
# What libpq's two copies leave: the process's own memory may grow by a few MiB besides.
SLACK_MIB = 16


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc/PID/status")


@pytest.mark.parametrize("streaming", [True, False], ids=["streamed", "at-commit"])
def test_one_huge_value_is_not_copied_past_libpq(source_db, dest_db, replicator, streaming):
    source_db.execute("create table doc (id int primary key, body text)")
    source_db.execute("insert into doc values (1, 'small')")
    source_db.execute(f"create publication {PUBLICATION} for table doc")
    r = replicator(flush_interval=0.2, source={"streaming": streaming})
    r.start()
    wait_for(r.streaming, 60, "streaming")
    wait_for(lambda: dest_db.scalar(f"select count(*) from {MIRROR_SCHEMA}.doc") == 1, 30,
             "the initial row")
    before = peak_rss_mib(r.proc.pid)
    # md5 pieces: not one repeated byte, so no layer can get away with a run-length shortcut.
    source_db.execute("update doc set body = (select string_agg(md5(g::text), '') "
                      f"from generate_series(1, {VALUE_MB} * 1024 * 1024 / 32) g) where id = 1")
    wait_for(lambda: dest_db.scalar(f"select length(body) from {MIRROR_SCHEMA}.doc "
                                    "where id = 1") == VALUE_MB * 1024 * 1024, 120,
             "the huge value in the mirror")
    assert dest_db.scalar(f"select md5(body) from {MIRROR_SCHEMA}.doc") == \
        source_db.scalar("select md5(body) from doc")
    peak = peak_rss_mib(r.proc.pid)
    assert peak - before <= 2 * VALUE_MB + SLACK_MIB, \
        f"peak RSS {peak:.0f} MiB, {before:.0f} before the value"
    assert r.alive, r.logs()
    assert "retrying after an error" not in r.current(), r.logs()


@pytest.mark.parametrize("streaming", [True, False], ids=["streamed", "at-commit"])
def test_big_values_left_in_place_keep_their_rows_in_order(source_db, dest_db, replicator,
                                                           streaming):
    """Values of 1 MiB and more (left in their message) between small ones, in every column
    of several rows of one transaction, updated and deleted again in it: the mirror ends
    equal, with each value in its row."""
    source_db.execute("create table doc (id int primary key, a text, b text, n int)")
    source_db.execute(f"create publication {PUBLICATION} for table doc")
    r = replicator(flush_interval=0.2, source={"streaming": streaming})
    r.start()
    wait_for(r.streaming, 60, "streaming")
    big = "(select string_agg(md5((g + {k})::text), '') from generate_series(1, {n}) g)"
    with source_db.connect() as conn:
        for i in range(1, 13):
            # 2, 1.03 and 0.5 MiB values: on both sides of the 1 MiB line.
            conn.execute(f"insert into doc values ({i}, {big.format(k=i, n=65536)}, "
                         f"{big.format(k=-i, n=(33792 if i % 2 else 16384))}, {i})")
        conn.execute(f"update doc set b = {big.format(k=99, n=40000)} where id % 3 = 0")
        conn.execute("update doc set n = n + 100 where id % 4 = 0")  # a unchanged TOAST
        conn.execute("delete from doc where id in (5, 7)")
        conn.commit()
    source_db.execute("insert into doc values (100, 'small', 'after', 0)")
    wait_for(lambda: dest_db.scalar(f"select count(*) from {MIRROR_SCHEMA}.doc "
                                    "where id = 100") == 1, 120, "the row after")
    assert_same(source_db, dest_db, "doc")
    assert r.alive, r.logs()
