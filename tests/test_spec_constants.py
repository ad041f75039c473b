"""SPEC.md against the code: the constants table of §7 (both directions), the state tables of §8.1
and §8.2, and the message layouts of §3."""

from __future__ import annotations

import ast
import operator
import re
from pathlib import Path

import pytest

from vpncore.proto import client, constants, server, wire

SPEC = (Path(__file__).resolve().parent.parent / "protocol-spec" / "SPEC.md").read_text()
NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")


def section(number: str) -> str:
    """The text of the section headed `number` (e.g. "7" or "8.1") up to the next heading of its level or above."""
    level = "#" * (2 + number.count("."))
    start = re.search(rf"^{level} {re.escape(number)}\.? .*$", SPEC, re.M)
    assert start, f"SPEC.md has no section {number}"
    depth = len(level)
    nxt = re.compile(rf"^#{{2,{depth}}} ", re.M)
    end = nxt.search(SPEC, start.end())
    return SPEC[start.end():end.start() if end else len(SPEC)]


def table_rows(text: str) -> list[list[str]]:
    """Cells of every markdown table row (header and separator rows included); `\\|` is not a separator."""
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("|"):
            continue
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        rows.append(cells)
    return rows


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Pow: operator.pow}


def spec_value(cell: str):
    """A table value: an int or float (or an arithmetic expression of ints), a bytes or a str literal."""
    text = cell.strip().strip("`").strip()

    def ev(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, bytes, str)) \
                and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = ev(node.left), ev(node.right)
            assert isinstance(left, int) and isinstance(right, int), cell
            return _OPS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        raise ValueError(f"not a constant value: {cell!r}")

    return ev(ast.parse(text, mode="eval").body)


def spec_constants() -> dict:
    rows = [r for r in table_rows(section("7")) if r and NAME.match(r[0].strip("`"))]
    names = [r[0].strip("`") for r in rows]
    duplicates = {n for n in names if names.count(n) > 1}
    assert not duplicates, f"listed twice in SPEC §7: {sorted(duplicates)}"
    for r in rows:
        assert len(r) == 3 and r[2], f"SPEC §7 row needs | NAME | value | meaning |: {r}"
    return {r[0].strip("`"): spec_value(r[1]) for r in rows}


def code_constants() -> dict:
    return {name: value for name, value in vars(constants).items()
            if NAME.match(name) and isinstance(value, (int, float, bytes, str)) and not isinstance(value, bool)}


SPEC_CONSTANTS = spec_constants()
CODE_CONSTANTS = code_constants()


def test_the_table_is_found_and_not_trivial():
    assert len(SPEC_CONSTANTS) >= 30
    assert "REPLAY_WINDOW" in SPEC_CONSTANTS


@pytest.mark.parametrize("name", sorted(CODE_CONSTANTS))
def test_every_code_constant_is_in_the_spec_with_its_value(name):
    assert name in SPEC_CONSTANTS, f"{name} is in constants.py but not in SPEC §7"
    assert SPEC_CONSTANTS[name] == CODE_CONSTANTS[name], \
        f"{name}: SPEC §7 says {SPEC_CONSTANTS[name]!r}, constants.py has {CODE_CONSTANTS[name]!r}"
    assert type(SPEC_CONSTANTS[name]) is type(CODE_CONSTANTS[name])


@pytest.mark.parametrize("name", sorted(SPEC_CONSTANTS))
def test_every_spec_constant_is_in_the_code(name):
    assert name in CODE_CONSTANTS, f"{name} is in SPEC §7 but not in constants.py"


def test_spec_value_parser():
    assert spec_value("`2**64 - 2**13 - 1`") == 2**64 - 2**13 - 1
    assert spec_value('`b"mac1----"`') == b"mac1----"
    assert spec_value('`"superpacket"`') == "superpacket"
    assert spec_value("8192") == 8192
    with pytest.raises(ValueError):
        spec_value("__import__('os')")


# --- §8 state tables --------------------------------------------------------------------------

def transitions(number: str) -> dict:
    rows = table_rows(section(number))
    header = [c.lower() for c in rows[0]]
    assert header[:3] == ["state", "input", "next state"], header
    out = {}
    for r in rows[2:]:
        key = (r[0].strip("`"), r[1].strip("`"))
        assert key not in out, f"SPEC §{number} lists {key} twice"
        out[key] = r[2].strip("`")
    return out


def test_client_transition_table_matches_the_code():
    assert transitions("8.1") == client.TRANSITIONS


def test_server_peer_transition_table_matches_the_code():
    assert transitions("8.2") == server.PEER_TRANSITIONS


# --- §3 message layouts ----------------------------------------------------------------------

@pytest.mark.parametrize("number, total, struct_size", [
    ("3.1", constants.INITIATION_LEN, wire.INITIATION.size),
    ("3.2", constants.RESPONSE_LEN, wire.RESPONSE.size),
    ("3.3", constants.COOKIE_REPLY_LEN, wire.COOKIE_REPLY.size),
])
def test_handshake_message_tables_are_contiguous_and_complete(number, total, struct_size):
    at = 0
    for r in table_rows(section(number))[2:]:
        offset, size = int(r[0]), int(r[1])
        assert offset == at, f"SPEC §{number}: field {r[2]} at {offset}, expected {at}"
        at += size
    assert at == total == struct_size


@pytest.mark.parametrize("number", ["3.4", "3.5"])
def test_transport_header_tables(number):
    at = 0
    rows = table_rows(section(number))[2:]
    for r in rows[:-1]:
        offset, size = int(r[0]), int(r[1])
        assert offset == at
        at += size
    assert at == constants.TRANSPORT_HEADER_LEN == wire.TRANSPORT_HEADER.size
    assert int(rows[-1][0]) == constants.TRANSPORT_HEADER_LEN
