"""read_file opens a path once and checks what it opened (issue 22, item 10).

A sandbox flips a path between a regular file, /dev/zero and a FIFO as fast as it can,
while read_file reads it again and again. Checking the path and then opening it again
(the old script) read the device until the timeout, or blocked on the FIFO. Opening
once and checking that descriptor can only see one of the three.
"""

from __future__ import annotations

from typing import Any

from conftest import FIGURES, new_session, sh

# Flips `p` atomically (a rename over it) between a symlink to a file, to /dev/zero and
# to a FIFO, in a loop that outlives the test only as long as its session.
FLIPPER = (
    "cd /tmp && printf 'hello\\n' > file && mkfifo fifo && ln -s file p && "
    "while :; do for t in /dev/zero fifo file; do ln -sfn $t p.new && mv -T p.new p; done; done"
)


async def test_a_path_flipping_between_file_device_and_fifo_never_reads_the_device(
    launch: Any,
) -> None:
    # A short file-tool timeout, so that a read that hangs shows as a timeout quickly.
    server = launch("--default-timeout", "5")
    outcomes: dict[str, int] = {}
    async with server.client() as client:
        sid = await new_session(client)
        started = await client.call_tool("start_job", {"command": FLIPPER, "session_id": sid})
        assert not started.is_error
        assert (await sh(client, "sleep 0.5; ls /tmp/p", session_id=sid))["retval"] == 0
        for _ in range(60):
            result = await client.call_tool(
                "read_file", {"path": "/tmp/p", "session_id": sid}, raise_on_error=False
            )
            text = result.content[0].text if result.is_error else None
            if text is None:
                outcome = "file: " + result.structured_content["content"]
            elif "is not a regular file" in text or "does not exist" in text:
                outcome = "refused"
            else:
                outcome = "error: " + text[:200]
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    FIGURES["read_file of a flipping path, 60 calls"] = str(outcomes)
    assert set(outcomes) <= {"file: hello\n", "refused"}, outcomes
    assert outcomes.get("file: hello\n") and outcomes.get("refused"), outcomes
    server.stop()


async def test_read_file_without_perl_says_what_to_do_instead(launch: Any) -> None:
    server = launch()
    async with server.client() as client:
        sid = await new_session(client)
        await sh(client, "echo hi > f && rm -f /usr/bin/perl", session_id=sid)
        result = await client.call_tool(
            "read_file", {"path": "f", "session_id": sid}, raise_on_error=False
        )
        assert result.is_error and "perl" in result.content[0].text
        assert "shell_exec" in result.content[0].text
    server.stop()
