"""The shared fixtures live in pytest plugins (tests/plugins/), registered here once so that
every test folder sees the same clusters, databases and replicator helpers."""

pytest_plugins = ["plugins.servers", "plugins.replicator", "plugins.proxy", "plugins.pgbouncer"]
