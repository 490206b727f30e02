"""plain_text.render: what a model reads of each tool's result (no Podman)."""

from __future__ import annotations

from pod_exec_mcp.plain_text import render


def test_a_command_is_its_output_then_one_status_line() -> None:
    base = {"output": "a\nb\n", "retval": 0, "truncated": False, "timed_out": False}
    assert render(base) == "a\nb\n[exit status 0]"
    assert render({**base, "output": "x"}) == "x\n[exit status 0]"
    cut = {**base, "retval": 124, "timed_out": True, "truncated": True, "output_file": "/f"}
    assert render(cut).endswith("[exit status 124, timed out, output cut; all of it in /f]")
    running = {**base, "retval": -1, "running": True, "job_id": "job_1"}
    assert render(running).endswith("[still running as job job_1: read_job for the rest]")


def test_a_job_read_and_a_file_read() -> None:
    job = {
        "job_id": "j",
        "output": "",
        "running": True,
        "retval": None,
        "truncated": False,
        "log_file": None,
    }
    assert render(job) == "[running]"
    page = {
        "path": "/etc/x", "content": "1\n2\n", "encoding": "text", "total_bytes": 4,
        "total_lines": 2, "offset": 1, "next_offset": None, "truncated": False,
    }  # fmt: skip
    assert render(page) == "1\n2\n[/etc/x: 4 bytes, from line 1]"
    assert "more from line 3 (pass it as offset)" in render({**page, "next_offset": 3})


def test_other_results_are_key_value_lines() -> None:
    assert render({"session_id": "abc"}) == "session_id: abc"
    assert render({"path": "/w", "bytes_written": 3}) == "path: /w\nbytes_written: 3"
