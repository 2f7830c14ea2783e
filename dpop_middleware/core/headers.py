"""Reading ``Authorization`` and ``DPoP``; writing ``WWW-Authenticate``.

RFC 9449 figure 12: ``credentials = "DPoP" 1*SP token68``; the auth-scheme is case-insensitive
(RFC 9110 section 11.1). The ``DPoP`` header value is a token68 compact JWS (figure 3).
"""

from __future__ import annotations

import re
from typing import NamedTuple

from dpop_middleware.core.request import RequestInfo
from dpop_middleware.errors import (
    DPoPError,
    InsufficientScopeError,
    InvalidDPoPProofError,
    InvalidRequestError,
    MissingCredentialsError,
)

# RFC 9110 section 11.2: token68 = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
_TOKEN68 = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_DPOP_OR_BEARER = re.compile(
    r"([Dd][Pp][Oo][Pp]|[Bb][Ee][Aa][Rr][Ee][Rr]) +([A-Za-z0-9\-._~+/]+=*)"
)
_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z0-9!#$%&'*+\-.^_`|~]+)(?: +(?P<token>\S+))? *")
# RFC 6750 section 3: error_description is %x20-21 / %x23-5B / %x5D-7E.
_DESCRIPTION_BAD = re.compile(r"[^\x20-\x21\x23-\x5b\x5d-\x7e]")


class HeaderScan(NamedTuple):
    """What one pass over the request headers found (RFC 9449 section 4.3 step 1 needs them all)."""

    authorization: str  # the one Authorization value, not yet parsed
    proofs: list[str]  # every DPoP header value
    hosts: list[str]  # every Host header value (for htu)


def scan_headers(request: RequestInfo) -> HeaderScan:
    """One pass over the headers; refuses every ambiguous way of sending the access token.

    * more than one ``Authorization`` header, or a token in the query as well: 400
      ``invalid_request`` (RFC 6750 section 2, RFC 9449 figure 19);
    * no usable credentials: 401 without an error code (RFC 6750 section 3.1).

    The value is parsed by :func:`parse_authorization` (or found in the token cache, which is
    keyed by whole values that parsed before), then the proof by :func:`proof_value`.
    """
    auth: list[str] = []
    proofs: list[str] = []
    hosts: list[str] = []
    for name, value in request.headers:  # one pass; duplicates kept
        if name == "authorization":
            auth.append(value)
        elif name == "dpop":
            proofs.append(value)
        elif name == "host":
            hosts.append(value)
    query = request.query_string
    in_query = bool(query) and _query_has_token(query)
    if len(auth) > 1 or (auth and in_query):
        raise InvalidRequestError(
            "multiple_auth_methods", "Multiple methods used to include access token", scheme="both"
        )
    if in_query:
        raise InvalidRequestError(
            "token_in_query", "Access tokens in the query are not accepted", scheme="both"
        )
    if not auth:
        raise MissingCredentialsError("no_credentials", "No access token")
    return HeaderScan(auth[0], proofs, hosts)


def parse_authorization(value: str, max_token_size: int) -> tuple[str, str]:
    """The whole grammar of an ``Authorization`` value: (lower-cased scheme, token68)."""
    # A WSGI server joins repeated headers with ", "; token68 has no comma, so a comma after a
    # DPoP or Bearer scheme means two Authorization headers.
    if "," in value and value[:7].lower().startswith(("dpop ", "bearer ")):
        raise InvalidRequestError(
            "multiple_auth_methods", "Multiple methods used to include access token", scheme="both"
        )
    if len(value) > max_token_size + 8:
        raise InvalidRequestError("token_too_large", "Access token too large")
    fast = _DPOP_OR_BEARER.fullmatch(value)
    if fast is not None:
        return fast.group(1).lower(), fast.group(2)
    return _classify(value)


def proof_value(proofs: list[str], max_proof_size: int) -> str | None:
    """The one ``DPoP`` header value, or None. More than one, or a comma in it (a WSGI server
    joins repeated headers with commas, and a compact JWS has none): 401 ``invalid_dpop_proof``
    (RFC 9449 section 4.3 step 1); over ``max_proof_size``: refused before any parsing."""
    if not proofs:
        return None
    proof = proofs[0]
    if len(proofs) > 1 or "," in proof:
        raise InvalidDPoPProofError("multiple_proofs", "More than one DPoP header")
    proof = proof.strip()
    if len(proof) > max_proof_size:
        raise InvalidDPoPProofError("proof_too_large", "DPoP proof too large")
    return proof


def _classify(value: str) -> tuple[str, str]:
    """The slow path for an Authorization value that is not plain DPoP/Bearer + token68."""
    match = _CREDENTIALS.fullmatch(value)
    if match is None:
        raise InvalidRequestError("malformed_authorization", "Malformed Authorization header")
    scheme = match.group("scheme").lower()
    token = match.group("token")
    if scheme not in ("dpop", "bearer"):
        raise MissingCredentialsError("unsupported_scheme", "Unsupported authorization scheme")
    if token is None or _TOKEN68.fullmatch(token) is None:
        raise InvalidRequestError("malformed_authorization", "Malformed Authorization header")
    return scheme, token


def _escaped(char: str) -> str:
    """``char`` or its percent-escape, hex digits in either case."""
    code = f"{ord(char):02X}"
    hi, lo = code[0], code[1]
    hex_lo = f"[{lo}{lo.lower()}]" if lo.isalpha() else lo
    return f"(?:{re.escape(char)}|%{hi}{hex_lo})"


# An ``access_token`` parameter name as the application reads it (form-decoded: ``access%5Ftoken``
# is the same name). One regex pass, linear in the query: decoding every name of a query full of
# "%" would let anyone make each request cost milliseconds before any credential is checked.
_QUERY_TOKEN = re.compile("(?:^|&)" + "".join(map(_escaped, "access_token")) + "(?:=|&|$)")


def _query_has_token(query: str) -> bool:
    """An ``access_token`` parameter in the query (RFC 6750 section 2.3)."""
    if "access_token" not in query and "%" not in query:
        return False
    return _QUERY_TOKEN.search(query) is not None


def _quote(value: str) -> str:
    return '"' + _DESCRIPTION_BAD.sub("?", value) + '"'


def challenge(
    error: DPoPError | None,
    *,
    algs: str,
    realm: str | None = None,
    resource_metadata: str | None = None,
    bearer: bool = False,
) -> str:
    """The ``WWW-Authenticate`` value for a refusal (RFC 9449 sections 7.1 and 7.2).

    Without an error (no credentials), no ``error`` parameter (figures 15 and 17). With Bearer
    also offered, the error goes on the challenge of the scheme that was used (figure 18), or on
    both when that cannot be told (figure 19). ``algs`` is always on the DPoP challenge.
    """
    params: list[str] = []
    if realm is not None:
        params.append(f"realm={_quote(realm)}")
    if resource_metadata is not None:  # RFC 9728 section 5.1, on every challenge offered
        params.append(f"resource_metadata={_quote(resource_metadata)}")
    code = error.error if error is not None else None
    err_params: list[str] = []
    if code is not None and error is not None:
        err_params = [f"error={_quote(code)}", f"error_description={_quote(error.description)}"]
        if isinstance(error, InsufficientScopeError):
            # RFC 6750 section 3: scope = space-delimited scope-tokens (NQCHAR only, checked
            # at start-up), so the value needs no escaping.
            err_params.append(f"scope={_quote(' '.join(error.scopes))}")
    on_dpop = error is not None and error.scheme in ("DPoP", "both")
    on_bearer = error is not None and error.scheme in ("Bearer", "both")
    dpop = ", ".join(
        [*params, *(err_params if on_dpop or not bearer else []), f"algs={_quote(algs)}"]
    )
    if not bearer:
        return f"DPoP {dpop}"
    bearer_params = ", ".join([*params, *(err_params if on_bearer else [])])
    bearer_part = f"Bearer {bearer_params}" if bearer_params else "Bearer"
    return f"{bearer_part}, DPoP {dpop}"
