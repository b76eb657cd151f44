"""``python -m replicator``: the same as the ``replicator`` console script."""

from .cli import main

raise SystemExit(main())
