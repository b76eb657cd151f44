-- Why the pipeline's last writer stopped, for `replicator status`: written when it lets
-- go of its lease (its error's one line, or how it was stopped), cleared when a writer
-- takes the lease. A writer killed outright writes nothing: its lease runs out instead,
-- and renewed_at says when it was last seen.
alter table {state}.leases add column if not exists exit_reason text;
