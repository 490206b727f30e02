"""The agent's wire constants have one source of truth, image/agent/protocol.h.

The host declares them again in Python (agent_channel.py, agent_streams.py) and the
protocol document lists them in tables and prose; this parses protocol.h and fails where
either disagrees with it. Pure Python: no compiler, no Podman.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pod_exec_mcp import agent_channel, agent_streams

ROOT = Path(__file__).resolve().parent.parent
HEADER_FILE = ROOT / "image" / "agent" / "protocol.h"
DOC = ROOT / "docs" / "agent-protocol.md"


def c_constants() -> dict[str, int]:
    """Every `NAME = value,` enum entry and the numeric #defines of protocol.h."""
    text = re.sub(r"/\*.*?\*/", "", HEADER_FILE.read_text(), flags=re.S)
    found: dict[str, int] = {}
    for name, value in re.findall(r"^\s*([A-Z][A-Z0-9_]*) = (0x[0-9a-fA-F]+|\d+),$", text, re.M):
        assert name not in found, f"{name} is declared twice in protocol.h"
        found[name] = int(value, 0)
    for name, expr in re.findall(r"^#define ([A-Z][A-Z0-9_]*) (.+)$", text, re.M):
        # Only integer expressions like `(1024u * 1024u)`: unsigned suffixes dropped.
        plain = re.sub(r"(\d)u\b", r"\1", expr)
        assert re.fullmatch(r"[\d\s()*+]+", plain), f"unexpected #define {name} {expr}"
        found[name] = eval(plain)  # digits, spaces, parentheses and * + only: checked above
    return found


C = c_constants()


def python_constants(prefix: str) -> dict[str, int]:
    """The host modules' module-level ints named PREFIX..., checked to agree where both
    modules define one."""
    found: dict[str, int] = {}
    for module in (agent_channel, agent_streams):
        for name, value in vars(module).items():
            if name.startswith(prefix) and isinstance(value, int):
                assert found.setdefault(name, value) == value, f"{name} differs between modules"
    return found


def c_group(prefix: str) -> dict[str, int]:
    return {name: value for name, value in C.items() if name.startswith(prefix)}


def test_the_header_parses_into_the_expected_groups() -> None:
    # A parser that silently found nothing would make every comparison below vacuous.
    assert C["T_HELLO"] == 0x01 and C["T_SPLICE_END"] == 0x97
    assert len(c_group("T_")) == 29 and len(c_group("E_")) == 8


@pytest.mark.parametrize("prefix", ["T_", "F_", "X_", "FLD_"])
def test_python_constants_match_the_header(prefix: str) -> None:
    assert python_constants(prefix) == c_group(prefix)


def test_python_scalars_match_the_header() -> None:
    assert C["PROTOCOL_VERSION"] == agent_channel.PROTOCOL_VERSION
    assert C["MAX_PAYLOAD"] == agent_channel.MAX_PAYLOAD
    assert agent_channel.HEADER.size == agent_streams.HEADER.size == C["HDR_LEN"]
    assert C["SPLICE_ONE_REQUEST"] == agent_streams.SPLICE_ONE_REQUEST
    # The agent-to-host stream frames, which agent_channel routes to agent_streams.
    assert {v for v in c_group("T_").values() if 0x90 <= v <= 0x9F} == agent_streams.STREAM_FRAMES


def test_error_names_match_the_header() -> None:
    expected = {value: name[2:].lower().replace("_", " ") for name, value in c_group("E_").items()}
    assert expected == agent_channel.ERROR_NAMES


def doc_frame_types() -> dict[str, int]:
    """The frame tables' rows: `| 0x01 | HELLO |`, or `| 0x11 / 0x91 | STREAM_DATA |` for a
    frame of both directions (the agent's is the header's NAME_IN)."""
    found: dict[str, int] = {}
    rows = re.findall(
        r"^\| (0x[0-9A-F]{2})(?: / (0x[0-9A-F]{2}))? \| ([A-Z_]+) \|", DOC.read_text(), re.M
    )
    for host, agent, name in rows:
        found[f"T_{name}"] = int(host, 16)
        if agent:
            found[f"T_{name}_IN"] = int(agent, 16)
    return found


def doc_list(lead: str) -> dict[str, int]:
    """A prose list such as `ERROR codes: 1 BAD_FRAME, 2 BAD_VERSION, ...` (its paragraph)."""
    paragraphs = [p for p in DOC.read_text().split("\n\n") if lead in p]
    assert len(paragraphs) == 1, f"expected one paragraph with {lead!r} in the document"
    text = paragraphs[0].split(lead, 1)[1].split("\n|", 1)[0]  # in a table: that row only
    return {name: int(value) for value, name in re.findall(r"\b(\d+) ([A-Z][A-Z_]+)\b", text)}


def test_the_documents_frame_tables_match_the_header() -> None:
    assert doc_frame_types() == c_group("T_")


def test_the_documents_code_and_flag_lists_match_the_header() -> None:
    assert {f"E_{k}": v for k, v in doc_list("ERROR codes:").items()} == c_group("E_")
    assert {f"X_{k}": v for k, v in doc_list("EXIT flags:").items()} == c_group("X_")
    fields = doc_list("then fields `u8 tag, u32 len, bytes`:")
    assert {f"FLD_{k}": v for k, v in fields.items()} == c_group("FLD_")
    assert "bit 0 STDIN_FOLLOWS" in DOC.read_text() and C["F_STDIN_FOLLOWS"] == 1 << 0
