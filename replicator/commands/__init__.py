"""The `replicator` commands: the CLI and one module per command that is more than a call."""
