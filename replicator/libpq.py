"""Addresses of libpq functions for the compiled loops (`_decode`, `pipeline._pipe`).

They are taken from the libpq psycopg itself loaded, through its ctypes handle: the
PGconn pointers psycopg hands out are only meaningful to that library, so the C
loops must call the very same one. Only psycopg's "python" implementation loads
libpq that way; its C/binary implementations link (or bundle) their own copy,
which ctypes cannot reach. The functions' C types are declared in _libpq.pxd.
"""

from __future__ import annotations

import ctypes

from psycopg import pq

from .errors import ErrorKind, ReplicatorError


def function_addresses(*names: str) -> tuple[int, ...]:
    """The addresses of the named libpq functions (e.g. "PQgetCopyData"), in order."""
    if pq.__impl__ != "python":
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
