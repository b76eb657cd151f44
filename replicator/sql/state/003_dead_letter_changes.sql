-- Dead letters that can be retried: a change the mirror rejected (on_error = "dead_letter")
-- keeps what is needed to apply it later, in order with the other changes of its key.
--
-- op:        I, U or D; NULL for a letter that cannot be retried (an unchanged TOAST value
--            no earlier image could supply: only a resync of the table brings it)
-- key_data:  the key columns as jsonb (mirror-typed values), matched against later changes
-- old_key:   for a primary-key change, the key the row had before
-- row_data:  the new row (for a delete: the key), without the columns in unchanged
-- unchanged: columns sent as unchanged TOAST values: a retry keeps the mirror's value
-- sqlstate:  the server's SQLSTATE for the last attempt; reason holds its message
alter table {state}.dead_letters
    add column if not exists op "char",
    add column if not exists key_data jsonb,
    add column if not exists old_key jsonb,
    add column if not exists unchanged text[],
    add column if not exists sqlstate text,
    add column if not exists retries int not null default 0,
    add column if not exists retried_at timestamptz;

-- Every batch that touches a table with waiting letters looks its keys up here.
create index if not exists dead_letters_key on {state}.dead_letters (slot, mirror_table, key_data);
