"""Reading the source: the replication connection and the catalog queries."""
