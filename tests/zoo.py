"""A table with a column of every type the mirror must carry, and rows for it."""

from plugins.replicator import PUBLICATION

ZOO = """
create table zoo (
    id integer primary key,
    n8 bigint,
    amount numeric(16, 2),
    ratio double precision,
    code varchar(32),
    body text,
    meta jsonb,
    flag boolean,
    day date,
    at timestamp,
    atz timestamptz,
    blob bytea,
    ints integer[],
    tags text[],
    uid uuid,
    span interval
)
"""

ZOO_ROWS = """
insert into zoo
select g, g * 10000000000, g * 1.25, g / 3.0, 'c' || g,
       case when g % 4 = 0 then repeat(md5(g::text), 100) else 'short ' || g end,
       jsonb_build_object('g', g, 'nested', jsonb_build_object('x', array[g, g + 1]),
                          'name', jsonb_build_object('en_US', 'Name ' || g, 'fr_FR', 'Nom ' || g)),
       g % 2 = 0, date '2024-01-01' + g, timestamp '2024-01-01 10:00:00.123456' + g * interval '1 hour',
       timestamptz '2024-06-01 10:00:00+02' + g * interval '1 minute',
       decode(md5(g::text), 'hex'), array[g, -g, null], array['a' || g, null, 'ü'],
       md5(g::text)::uuid, g * interval '1 day 2 hours'
from generate_series({start}, {stop}) g
"""


def zoo_rows(stop: int, start: int = 1) -> str:
    return ZOO_ROWS.format(start=start, stop=stop)


def setup_zoo(source_db) -> None:
    source_db.execute(ZOO)
    source_db.execute(f"create publication {PUBLICATION} for table zoo")
