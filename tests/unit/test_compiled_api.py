"""The compiled modules against what is declared about them.

The event codes come from one enum (_decode.pxd) and the .pyi stubs describe the
modules by hand: these tests catch a stub or a code that drifted from the build.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from replicator import _decode
from replicator.pipeline import _pipe


def test_event_codes_are_the_enum_values_as_distinct_ints():
    members = _decode.Event.__members__
    exported = {n: getattr(_decode, n) for n in dir(_decode) if n.startswith("EV_")}
    assert set(exported) == set(members)
    for name, value in exported.items():
        # a plain int, not the enum member: the receive loop compares many of them
        assert type(value) is int, name
        assert value == int(members[name]), name
    assert len(set(exported.values())) == len(exported)


def test_the_stub_lists_the_event_codes():
    """_decode.pxd is where the codes are written; the .pyi repeats them for type checkers,
    so it must say the same: every member, its value, and an EV_ constant for each."""
    tree = ast.parse(Path(_decode.__file__).with_name("_decode.pyi").read_text())
    enum = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Event")
    stub = {a.targets[0].id: a.value.value for a in enum.body if isinstance(a, ast.Assign)}
    assert stub == {name: int(m) for name, m in _decode.Event.__members__.items()}
    constants = {n.target.id for n in tree.body
                 if isinstance(n, ast.AnnAssign) and n.target.id.startswith("EV_")}
    assert constants == set(stub)


def test_event_codes_reach_python_from_the_c_side():
    # feed_frame's return value is computed in C from the enum: a keepalive and
    # a Begin must come back as the Python constants.
    dec = _decode.Decoder()
    keepalive = b"k" + (300).to_bytes(8, "big") + (13).to_bytes(8, "big") + b"\x01"
    assert dec.feed_frame(keepalive) == _decode.EV_KEEPALIVE
    begin = b"B" + (150).to_bytes(8, "big") + (5).to_bytes(8, "big") + (9).to_bytes(4, "big")
    assert dec.feed(begin) == _decode.EV_BEGIN


def test_copy_framing_is_the_decoders():
    from replicator import batch

    assert batch.COPY_HEADER is _decode.COPY_HEADER
    assert batch.COPY_TRAILER is _decode.COPY_TRAILER
    assert _decode.COPY_HEADER == b"PGCOPY\n\xff\r\n\x00" + bytes(8)
    assert _decode.COPY_TRAILER == b"\xff\xff"
    dec = _decode.Decoder()
    dec.define(7, 1, [0], True)
    dec.feed(b"B" + (150).to_bytes(8, "big") + bytes(8) + (9).to_bytes(4, "big"))
    dec.feed(b"I" + (7).to_bytes(4, "big") + b"N" + (1).to_bytes(2, "big") + b"t"
             + (1).to_bytes(4, "big") + b"1")
    [(_relid, data, _counts)] = dec.take()
    assert data.startswith(_decode.COPY_HEADER) and data.endswith(_decode.COPY_TRAILER)


def _public(names) -> set[str]:
    return {n for n in names if not n.startswith("_")}


def _stub(module) -> tuple[dict[str, ast.AST], dict[str, set[str]]]:
    """Top-level public names of the module's .pyi, and the public members of its classes."""
    tree = ast.parse(Path(module.__file__).with_name(
        f"{module.__name__.rsplit('.', 1)[1]}.pyi").read_text())
    top: dict[str, ast.AST] = {}
    members: dict[str, set[str]] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            top[node.name] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            top[node.target.id] = node
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    top[t.id] = node
        if isinstance(node, ast.ClassDef):
            names = set()
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    names.add(item.name)
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    names.add(item.target.id)
                elif isinstance(item, ast.Assign):
                    names.update(t.id for t in item.targets if isinstance(t, ast.Name))
            members[node.name] = _public(names) | ({"__init__"} & names)
    return {n: v for n, v in top.items() if not n.startswith("_")}, members


@pytest.mark.parametrize("module", [_decode, _pipe], ids=lambda m: m.__name__)
def test_stub_matches_the_compiled_module(module):
    top, members = _stub(module)
    runtime = _public(dir(module))
    assert set(top) - runtime == set(), "declared in the stub, missing from the module"
    assert runtime - set(top) == set(), "in the module, missing from the stub"
    for name, node in top.items():
        obj = getattr(module, name)
        if isinstance(node, ast.ClassDef):
            assert inspect.isclass(obj), name
        elif isinstance(node, ast.FunctionDef):
            assert callable(obj) and not inspect.isclass(obj), name
        else:
            assert not callable(obj), name
    for cls, declared in members.items():
        obj = getattr(module, cls)
        if issubclass(obj, BaseException):
            continue
        actual = _public(vars(obj)) if not issubclass(obj, int) else set(obj.__members__)
        declared = declared - {"__init__"}
        assert declared - actual == set(), f"{cls}: declared in the stub, missing"
        assert actual - declared == set(), f"{cls}: missing from the stub"
