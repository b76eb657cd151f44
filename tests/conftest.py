"""The shared fixtures live in pytest plugins (tests/plugins/), registered here once so that
every test folder sees the same clusters, databases and replicator helpers."""

import os

from hypothesis import settings

pytest_plugins = ["plugins.servers", "plugins.replicator", "plugins.proxy", "plugins.pgbouncer",
                  "plugins.schedule"]

# In CI the same examples every run (a failure there reproduces here with CI=true); on a
# developer's machine new ones each time.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
