-- get_pending_expenses() names everything with its schema: a fixed, empty search_path,
-- as on every function init creates (Supabase's linter flags a mutable one).
alter function {mirror}.get_pending_expenses() set search_path = '';
