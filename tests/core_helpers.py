"""Drive the sans-IO core directly: build a RequestInfo from a URL, run the Engine, read the answer."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from dpop_middleware import Settings
from dpop_middleware.core.request import RequestInfo
from dpop_middleware.flow import Engine, Outcome
from dpop_middleware.replay import create_sync_store


def request(
    method: str,
    url: str,
    headers: Sequence[tuple[str, str]] = (),
    *,
    client_ip: str | None = "203.0.113.7",
    root_path: str = "",
    host: str | None = None,
) -> RequestInfo:
    parts = urlsplit(url)
    all_headers = [("host", host if host is not None else parts.netloc)]
    all_headers += [(name.lower(), value) for name, value in headers]
    return RequestInfo(
        method=method,
        scheme=parts.scheme,
        path=parts.path or "/",
        headers=tuple(all_headers),
        root_path=root_path,
        query_string=parts.query,
        client_ip=client_ip,
    )


@dataclass
class Answer:
    outcome: Outcome

    @property
    def status(self) -> int:
        return 200 if self.outcome.refusal is None else self.outcome.refusal.status

    @property
    def error(self) -> str | None:
        return None if self.outcome.refusal is None else self.outcome.refusal.error.error

    @property
    def reason(self) -> str | None:
        return None if self.outcome.refusal is None else self.outcome.refusal.error.reason

    def header(self, name: str) -> list[str]:
        source = (
            self.outcome.refusal.headers if self.outcome.refusal else self.outcome.response_headers
        )
        return [v for k, v in source if k == name]

    @property
    def challenge(self) -> str:
        (value,) = self.header("www-authenticate")
        return value

    def challenge_params(self) -> dict[str, str]:
        return dict(re.findall(r'(\w+)="([^"]*)"', self.challenge))


class Harness:
    """An Engine with a memory store; ``send`` returns an :class:`Answer`."""

    def __init__(self, settings: dict[str, Any] | Settings) -> None:
        self.settings = settings if isinstance(settings, Settings) else Settings.from_dict(settings)
        self.engine = Engine(self.settings)
        self.store = create_sync_store(
            self.settings.replay_store, replay_ttl=self.settings.replay_ttl
        )

    def send(
        self, method: str, url: str, headers: Sequence[tuple[str, str]] = (), **kw: Any
    ) -> Answer:
        return Answer(self.engine.run_sync(request(method, url, headers, **kw), self.store))

    def dpop(self, key: Any, token: str, method: str, url: str, **proof_kw: Any) -> Answer:
        proof_kw.setdefault("iat", self.settings.clock())
        proof = key.proof(method, url, access_token=token, **proof_kw)
        return self.send(method, url, [("authorization", f"DPoP {token}"), ("dpop", proof)])
