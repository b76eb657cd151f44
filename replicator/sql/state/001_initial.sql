-- The state tables as the replicator created them before this schema was
-- versioned. Every statement stays "if not exists": a deployment made by that
-- older code already has some or all of them and records this file as run
-- without any change to them.
--
-- {state} is the state schema's name, filled in as an identifier; a literal
-- brace in a later file is written doubled.

create table if not exists {state}.pipelines (
    slot text primary key,
    applied_lsn pg_lsn not null,
    source_system_id text,
    updated_at timestamptz not null default now()
);

create table if not exists {state}.tables (
    slot text not null,
    source_table text not null,
    mirror_table text not null,
    state text not null,
    sync_lsn pg_lsn,
    rows_copied bigint not null default 0,
    updated_at timestamptz not null default now(),
    primary key (slot, source_table)
);

-- Which source column (attnum) each mirror column came from: a Relation
-- message names columns but carries no attnum, and a rename or Odoo's type
-- change (rename to x_moved0, add x) must move the mirror's values with the
-- right column, across restarts too.
create table if not exists {state}.columns (
    slot text not null,
    source_table text not null,
    attnum int not null,
    mirror_column text not null,
    primary key (slot, source_table, attnum)
);

create table if not exists {state}.dead_letters (
    id bigserial primary key,
    slot text not null,
    mirror_table text not null,
    lsn pg_lsn not null,
    reason text not null,
    row_data jsonb,
    created_at timestamptz not null default now()
);
