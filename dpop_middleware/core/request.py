"""A neutral view of the request, built by the adapters, read by the core."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """What the core needs to know about one HTTP request.

    ``headers`` keeps every header line as sent (names lower-cased), duplicates included: RFC 9449
    section 4.3 requires refusing two ``DPoP`` headers, so nothing may collapse them.
    ``path`` is the path below the mount point and ``root_path`` the mount point, both in their
    percent-encoded form where the server gives it (ASGI ``raw_path``, WSGI ``RAW_URI``).
    """

    method: str
    scheme: str
    path: str
    headers: tuple[tuple[str, str], ...]
    root_path: str = ""
    query_string: str = ""
    client_ip: str | None = None
    server: tuple[str, int | None] | None = None

    def header_values(self, name: str) -> list[str]:
        """Every value of header ``name`` (lower-case), in order."""
        return [value for key, value in self.headers if key == name]
