-- The invoice trigger's function runs as the replicator's role at every streamed insert:
-- a fixed, empty search_path (its body names every table with its schema), so no object
-- another role creates in a schema on the path can stand in for one it uses. The tables'
-- row-level security, policy and grants are init's (access.secure_table), as on the mirror.
alter function {mirror}.on_invoice_insert() set search_path = '';
