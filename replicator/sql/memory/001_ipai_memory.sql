-- AI memory ([destination] memory_triggers = true): the ipai_memory schema and
-- the deployment doc's invoice-to-memory trigger on the mirror's account_move.
-- "if not exists": a deployment that applied its own ipai_memory_schema.sql
-- keeps its tables (they need the columns the trigger writes).
--
-- {mirror} is the mirror schema; a literal brace is written doubled.

create schema if not exists ipai_memory;

create table if not exists ipai_memory.sessions (
    id uuid primary key default gen_random_uuid(),
    agent_id text not null,
    started_at timestamptz not null default now(),
    ended_at timestamptz,
    metadata jsonb not null default '{{}}'
);

create table if not exists ipai_memory.chunks (
    id bigserial primary key,
    session_id uuid references ipai_memory.sessions (id) on delete set null,
    topic text not null,
    content text not null,
    importance smallint not null default 3,
    created_at timestamptz not null default now(),
    metadata jsonb not null default '{{}}'
);

-- An ipai_memory made before (the deployment's own ipai_memory_schema.sql) must
-- take what the trigger writes: found out now, not by a failing batch later.
do $$
declare
    missing text;
begin
    select string_agg(format('%s.%s', t, c), ', ') into missing
    from (values ('sessions', 'id'), ('sessions', 'agent_id'), ('sessions', 'started_at'),
                 ('chunks', 'session_id'), ('chunks', 'topic'), ('chunks', 'content'),
                 ('chunks', 'importance')) need(t, c)
    where not exists (select 1 from information_schema.columns i
                      where i.table_schema = 'ipai_memory' and i.table_name = need.t
                        and i.column_name = need.c);
    if missing is not null then
        raise exception 'ipai_memory lacks the column(s) the invoice trigger uses: %', missing;
    end if;
end;
$$;

create index if not exists chunks_session_id_created_at_idx
    on ipai_memory.chunks (session_id, created_at);

-- The session the trigger files its chunks under (the doc's agent 'odoo-sync').
insert into ipai_memory.sessions (agent_id)
select 'odoo-sync'
where not exists (select 1 from ipai_memory.sessions where agent_id = 'odoo-sync');

-- The doc's trigger, with one addition: rows written by the initial copy or a
-- resync (the copy sets replicator.phase = 'copy' in its transactions) are
-- history, not news, and make no memory. A streamed insert makes exactly one:
-- the chunk is written in the batch's transaction, committed or rolled back
-- with the row. An update of an invoice makes none (AFTER INSERT only, as in
-- the doc).
create or replace function {mirror}.on_invoice_insert()
returns trigger
language plpgsql
as $$
begin
    if current_setting('replicator.phase', true) = 'copy' then
        return null;
    end if;
    insert into ipai_memory.chunks (session_id, topic, content, importance)
    select
        (select id from ipai_memory.sessions where agent_id = 'odoo-sync'
         order by started_at desc limit 1),
        'invoice-created',
        format('New invoice %s for %s: %s', new.name, new.partner_id, new.amount_total),
        4;
    return new;
end;
$$;

create or replace trigger invoice_to_memory
after insert on {mirror}.account_move
for each row execute function {mirror}.on_invoice_insert();

