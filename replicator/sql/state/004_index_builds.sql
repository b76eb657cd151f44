-- Secondary indexes a copy owes its mirror table: written when the copy plans
-- a table it creates, deleted once the index is built (indexes.py). They are
-- built after the table streams, one at a time, with CREATE INDEX
-- CONCURRENTLY; a row still here at a start is built then (an index left
-- invalid by an interrupted build is dropped first).
create table if not exists {state}.index_builds (
    id bigint generated always as identity,
    slot text not null,
    mirror_table text not null,
    index_schema text not null,
    index_name text not null,
    statement text not null,
    created_at timestamptz not null default now(),
    primary key (slot, index_schema, index_name)
);
