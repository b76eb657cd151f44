-- The pipeline's writer: exactly one process writes the mirror and the state
-- for a slot. The owner renews expires_at; another process takes over only
-- once it has passed (or the owner released it on a clean stop), and takes a
-- new generation. Every destination transaction that writes first locks this
-- row FOR KEY SHARE where generation is its own (lease.py): a takeover's
-- FOR UPDATE waits for those transactions, and an owner that lost the lease
-- finds no row of its generation and writes nothing. The clock is the
-- destination's now() on every side.
--
-- standby / standby_seen_at: the last process that waited for the lease (status
-- shows it); expiry, renewal and takeover never read them.
create table if not exists {state}.leases (
    slot text primary key,
    owner text not null,
    owner_host text not null,
    owner_pid int not null,
    generation bigint not null,
    acquired_at timestamptz not null default now(),
    renewed_at timestamptz not null default now(),
    expires_at timestamptz not null,
    released_at timestamptz,
    standby text,
    standby_seen_at timestamptz
);
