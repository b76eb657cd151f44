-- The source timeline the applied position was read on: after a failover of the source
-- (a promoted standby starts a new timeline), a position past the point where the new
-- timeline forked from it names transactions the new primary never had.
alter table {state}.pipelines add column if not exists source_timeline int;
