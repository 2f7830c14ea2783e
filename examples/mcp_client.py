"""An MCP client (official Python SDK) calling a DPoP-protected MCP server over streamable HTTP.

    .venv/bin/python -m examples.mcp_client http://127.0.0.1:8000/mcp

Every HTTP request the SDK makes (the POSTs of each message, the GET of the event stream, the
DELETE at the end) gets a fresh proof for its own method and URL from ``Httpx2DPoPAuth``, which
also retries once with the server's nonce when asked (``use_dpop_nonce``). The token comes from
the examples' local issuer, bound to a new key and issued for the server's URL (its ``aud``);
a real agent gets it from the authorization server named in the server's RFC 9728 metadata.
"""

from __future__ import annotations

import sys
from typing import Any

import anyio
import httpx2
from mcp.client.client import Client
from mcp.client.streamable_http import streamable_http_client

from dpop_middleware.client import Httpx2DPoPAuth
from dpop_middleware.testing import DPoPKey
from examples.local_issuer import issuer


def auth_for(url: str, key: DPoPKey | None = None) -> Httpx2DPoPAuth:
    """A DPoP auth for the MCP server at ``url``, with a token bound to ``key`` for that URL."""
    key = key or DPoPKey.generate()
    return Httpx2DPoPAuth(key, access_token=issuer.token(bound_to=key, claims={"aud": url}))


async def run(url: str, auth: Httpx2DPoPAuth) -> dict[str, Any]:
    """List the tools, call ``whoami``, and call ``count`` with its progress streamed over SSE."""
    progress: list[str] = []

    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        progress.append(message or str(done))

    async with (
        httpx2.AsyncClient(auth=auth, timeout=30) as http,
        Client(streamable_http_client(url, http_client=http)) as client,
    ):
        tools = await client.list_tools()
        whoami = await client.call_tool("whoami", {})
        counted = await client.call_tool("count", {"to": 3}, progress_callback=on_progress)
    return {
        "tools": sorted(tool.name for tool in tools.tools),
        "whoami": whoami.structured_content,
        "count": counted.content[0].text if counted.content else None,  # type: ignore[union-attr]
        "progress": progress,
    }


def main(argv: list[str]) -> int:
    url = argv[0] if argv else "http://127.0.0.1:8000/mcp"
    print(anyio.run(run, url, auth_for(url)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
