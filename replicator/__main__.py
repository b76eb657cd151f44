"""``python -m replicator``: the same as the ``replicator`` console script."""

from .commands.cli import main

raise SystemExit(main())
