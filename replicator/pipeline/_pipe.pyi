# The Python API of the compiled module replicator.pipeline._pipe (_pipe.pyx).

class Pipe:
    rows: int
    bytes: int
    cancelled: bool
    reading: bool  # waiting for the source's next CopyData
    def __init__(self, getcopydata: int, putcopydata: int, freemem: int) -> None: ...
    def run(self, src: int, dst: int) -> int:
        """0: the source finished; -2: the source failed; -3: the destination refused
        data; -4: cancelled."""
