-- Per replicated table, the source commit time of the last applied batch that
-- changed it: the applier writes it in the batch's own transaction (one
-- statement per batch, for the tables the batch changed), so it can never
-- claim more than the mirror holds.
--
-- {state} is the state schema's name; a literal brace is written doubled.

create table if not exists {state}.commit_times (
    slot text not null,
    source_table text not null,
    last_commit_at timestamptz not null,
    primary key (slot, source_table)
);

-- "Data as of" for a dashboard, per mirror table. A streaming table holds
-- every source change committed up to data_as_of (the latest commit the
-- replicator applied, whichever table it changed); last_commit_at is the
-- latest applied one that changed this table. lag is now() - data_as_of: the
-- replication lag on a busy source, the time since the last change on an
-- idle one. A table being copied has no data_as_of yet.
-- Not security_invoker: readers get SELECT on the view, never on the state tables.
create or replace view {state}.freshness as
select t.mirror_table,
       t.source_table,
       t.slot,
       t.state,
       c.last_commit_at,
       case when t.state = 'streaming' then s.data_as_of end as data_as_of,
       p.updated_at as applied_at,
       case when t.state = 'streaming' then now() - s.data_as_of end as lag,
       case when t.state = 'streaming'
            then extract(epoch from now() - s.data_as_of)::float8 end as lag_seconds
from {state}.tables t
left join {state}.commit_times c on c.slot = t.slot and c.source_table = t.source_table
left join {state}.pipelines p on p.slot = t.slot
left join (select slot, max(last_commit_at) as data_as_of
           from {state}.commit_times group by slot) s on s.slot = t.slot
where t.state <> 'removed';
