"""The text content of every tool result, written for a model to read (issue 25).

Hosts that hand the model the text content rather than `structuredContent` showed it one
escaped JSON line (`{"output":"a\\nb\\n","retval":0,...}`): alignment lost, more tokens.
The text is now the output itself, then one short status line; `structuredContent` stays
exactly as the output schema says.
"""

from __future__ import annotations

from typing import Any

import mcp_types as mt
from fastmcp.server.middleware import CallNext, Middleware, MiddlewareContext
from fastmcp.tools import ToolResult
from mcp_types import TextContent


def render(data: dict[str, Any]) -> str:
    """A tool's structured result as plain text."""
    if "retval" in data and "output" in data:  # shell_exec, read_job, stop_job
        return _with_status(data["output"], _command_status(data))
    if "content" in data and "encoding" in data:  # read_file
        return _with_status(data["content"], _file_status(data))
    return "\n".join(f"{key}: {value}" for key, value in data.items() if value is not None)


def _with_status(body: str, status: str) -> str:
    newline = "\n" if body and not body.endswith("\n") else ""
    return f"{body}{newline}[{status}]"


def _command_status(data: dict[str, Any]) -> str:
    is_job = "log_file" in data  # read_job and stop_job; shell_exec has output_file
    if data.get("running"):
        if is_job:
            return "running"
        return f"still running as job {data.get('job_id')}: read_job for the rest"
    retval = data["retval"]
    parts = ["ended without an exit status" if retval is None else f"exit status {retval}"]
    if data.get("timed_out"):
        parts.append("timed out")
    if data.get("truncated"):
        kept = data.get("output_file") or data.get("log_file")
        parts.append(f"output cut; all of it in {kept}" if kept else "output cut")
    return ", ".join(parts)


def _file_status(data: dict[str, Any]) -> str:
    unit = "line" if data["encoding"] == "text" else "byte"
    parts = [f"{data['path']}: {data['total_bytes']} bytes", f"from {unit} {data['offset']}"]
    if data.get("next_offset") is not None:
        parts.append(f"more from {unit} {data['next_offset']} (pass it as offset)")
    if data["encoding"] == "base64":
        parts.append("content is base64")
    return ", ".join(parts)


class PlainText(Middleware):
    """Replaces each successful result's text content with `render` of its structured
    content."""

    async def on_call_tool(
        self,
        context: MiddlewareContext[mt.CallToolRequestParams],
        call_next: CallNext[mt.CallToolRequestParams, ToolResult],
    ) -> ToolResult:
        result = await call_next(context)
        if result.is_error or not isinstance(result.structured_content, dict):
            return result
        text = render(result.structured_content)
        return ToolResult(
            content=[TextContent(type="text", text=text)],
            structured_content=result.structured_content,
            meta=result.meta,
        )
