"""The libpq psycopg loaded, reached directly: for the compiled loops, and what psycopg lacks.

The compiled loops (`_decode`, `pipeline._pipe`) call libpq functions by address; the
diagnosis of a refused connection sets its error verbosity, which psycopg has no call for.

They are taken from the libpq psycopg itself loaded, through its ctypes handle: the
PGconn pointers psycopg hands out are only meaningful to that library, so the C
code must call the very same one. Only psycopg's "python" implementation loads
libpq that way; its C/binary implementations link (or bundle) their own copy,
which ctypes cannot reach. The functions' C types are declared in _libpq.pxd.
"""

from __future__ import annotations

import ctypes

from psycopg import pq

from .errors import ErrorKind, ReplicatorError

PQERRORS_VERBOSE = 2      # PGVerbosity: messages carry their SQLSTATE


def reachable() -> bool:
    """Whether psycopg's libpq can be reached through ctypes (its "python" implementation)."""
    return pq.__impl__ == "python"


def set_error_verbosity(pgconn: pq.abc.PGconn, verbosity: int) -> None:
    """PQsetErrorVerbosity, e.g. on a connection still starting up. Only when reachable()."""
    assert reachable(), "libpq is not psycopg's ctypes one"
    # Private to psycopg, and importing it loads libpq through ctypes: only on this path.
    from psycopg.pq import _pq_ctypes

    fn = _pq_ctypes.pq.PQsetErrorVerbosity
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int]
    fn.restype = ctypes.c_int
    fn(pgconn.pgconn_ptr, verbosity)


def function_addresses(*names: str) -> tuple[int, ...]:
    """The addresses of the named libpq functions (e.g. "PQgetCopyData"), in order."""
    if not reachable():
        raise ReplicatorError(
            ErrorKind.INTERNAL,
            f"psycopg is using its {pq.__impl__!r} implementation: the replicator's compiled "
            "loops must call the same libpq as psycopg, and only the 'python' implementation "
            "exposes it",
            "install psycopg without the [binary]/[c] extras (the replicator shares "
            "psycopg's system libpq)",
        )
    # Private to psycopg, and importing it loads libpq through ctypes: only once checked above.
    from psycopg.pq import _pq_ctypes

    lib = _pq_ctypes.pq
    return tuple(ctypes.cast(getattr(lib, name), ctypes.c_void_p).value for name in names)
