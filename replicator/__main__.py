"""The ``replicator`` console script, and ``python -m replicator``: the same thing."""

from __future__ import annotations

import sys

from .errors import ErrorKind, ReplicatorError

# The compiled extensions: without them nothing replicates, and the import of the command
# line fails before it can say so in its own words.
COMPILED = ("replicator._decode", "replicator.pipeline._pipe")


def main() -> int:
    try:
        # Imported here, not above: a missing build is an operator's problem to be told in one
        # line, not an ImportError traceback.
        from .commands.cli import main as cli_main
    except ModuleNotFoundError as exc:
        if exc.name not in COMPILED:
            raise
        err = ReplicatorError(
            ErrorKind.INTERNAL, f"the compiled part {exc.name} is not built",
            "install the package with its extensions: pip install -e . (needs Cython and a C "
            "compiler)")
        print(f"error: {err.one_line()}", file=sys.stderr)
        return int(err.exit_code)
    return cli_main()


if __name__ == "__main__":
    raise SystemExit(main())
