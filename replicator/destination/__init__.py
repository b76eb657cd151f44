"""Writing the mirror: the batch transaction, its SQL, mirror DDL, the state, the lease."""
