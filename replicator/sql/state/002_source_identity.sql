-- The source table and publication membership (schema.publication_members) the
-- mirror's rows came from: another one (a table dropped and created again, or
-- one that left the publication and came back while nobody looked) means the
-- table must be copied again. NULL, as written by older versions, is trusted
-- and filled in on the next state change.
alter table {state}.tables add column if not exists source_identity text;
