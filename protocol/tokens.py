"""Bearer tokens naming the agent of a run that makes an HTTP write (AAS servers, registry).

The broker already knows who publishes; the AAS servers and the registry did not know who
writes, so anyone on the host could document a step nobody executed. Every write now carries
``Authorization: Bearer <token>``, a short JWT (PyJWT, HS256) whose ``sub`` is the writing
agent's short name and whose audience is the run's namespace, signed with a secret made for the
run (``secrets.token_urlsafe(32)``, 256 bits) and issued with the broker accounts.

Why one HMAC secret per run rather than a key per agent: every process of a run already holds
every agent's broker password (the worker processes get the whole book), so per-agent keys
would not narrow who can speak as whom, while one secret lets the registry and every agent
process verify any agent's token, including products ordered while the run goes on, without
distributing keys. What the token adds is that a process *without* the run's secrets (anything
else on the host) can no longer write, and that each write names its author for the owner's
authorization. Tokens live five minutes (a leaked one stops working soon); they are not bound to
a request (no replay protection within their lifetime: see docs/security.md).
"""

from __future__ import annotations

import os
import secrets
import time

import jwt

from protocol.topics import check_name

__all__ = ["LIFETIME", "NS_ENV", "SECRET_ENV", "AuthError", "RunTokens", "new_secret", "tokens_from_env"]

ALGORITHM = "HS256"
#: Seconds a token is valid; a cached token is renewed when less than a fifth of this is left.
LIFETIME = 300.0


#: Where a child process (the registry) finds the run's secret and namespace: its environment,
#: readable by its owner only, not its command line, which every local user can read.
SECRET_ENV = "TWINBID_HTTP_SECRET"
NS_ENV = "TWINBID_NS"


def tokens_from_env() -> RunTokens | None:
    """The run's tokens from ``TWINBID_HTTP_SECRET`` and ``TWINBID_NS``; None without them."""
    secret, ns = os.environ.get(SECRET_ENV), os.environ.get(NS_ENV)
    return RunTokens(secret, ns) if secret and ns else None


def new_secret() -> str:
    """A fresh per-run signing secret (256 bits)."""
    return secrets.token_urlsafe(32)


class AuthError(Exception):
    """No usable credentials on a request: answered 401 with the text."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


class RunTokens:
    """Issues and checks the tokens of one run: ``RunTokens(secret, ns)``."""

    def __init__(self, secret: str, ns: str, *, lifetime: float = LIFETIME) -> None:
        if len(secret) < 16:
            raise ValueError("the token secret must have at least 16 characters")
        self._secret = secret
        self.audience = f"twinbid:{ns}"
        self.lifetime = lifetime
        self._cache: dict[tuple[str, ...], tuple[str, float]] = {}

    def token(self, agent: str) -> str:
        """A token naming ``agent`` (cached until a fifth of its lifetime is left)."""
        return self.token_for((agent,))

    def token_for(self, agents: tuple[str, ...]) -> str:
        """A token naming every agent of ``agents`` (a node registers its agents in bulk)."""
        now = time.time()
        cached = self._cache.get(agents)
        if cached is not None and cached[1] - now > self.lifetime / 5:
            return cached[0]
        for agent in agents:
            check_name(agent, "agent name")
        exp = now + self.lifetime
        claims: dict[str, object] = {"sub": agents[0], "aud": self.audience, "iat": int(now), "exp": int(exp)}
        if len(agents) > 1:
            claims["agents"] = list(agents)
        token = jwt.encode(claims, self._secret, algorithm=ALGORITHM)
        if len(self._cache) > 4096:  # bulk tokens of batches gone by
            self._cache.clear()
        self._cache[agents] = (token, exp)
        return token

    def headers(self, agent: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(agent)}"}

    def caller(self, authorization: str | None) -> str:
        """The agent an ``Authorization`` header names; :class:`AuthError` if it names none."""
        return self._claims(authorization)[0]

    def callers(self, authorization: str | None) -> frozenset[str]:
        """Every agent an ``Authorization`` header names (one, or a node's batch)."""
        sub, claims = self._claims(authorization)
        extra = claims.get("agents") or []
        if not isinstance(extra, list) or not all(isinstance(a, str) for a in extra):
            raise AuthError("the bearer token's agents claim is not a list of names")
        return frozenset([sub, *extra])

    def _claims(self, authorization: str | None) -> tuple[str, dict]:
        if not authorization:
            raise AuthError("writes need an agent's bearer token (Authorization: Bearer ...)")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("the Authorization header must be 'Bearer <token>'")
        try:
            claims = jwt.decode(
                token.strip(),
                self._secret,
                algorithms=[ALGORITHM],
                audience=self.audience,
                options={"require": ["sub", "aud", "exp", "iat"]},
                leeway=5,
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("the bearer token has expired") from None
        except jwt.InvalidAudienceError:
            raise AuthError("the bearer token is for another plant") from None
        except jwt.PyJWTError as exc:
            raise AuthError(f"the bearer token is not valid: {type(exc).__name__}") from None
        try:
            return check_name(claims.get("sub"), "agent name"), claims
        except ValueError:
            raise AuthError("the bearer token names no valid agent") from None
