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

import secrets
import time

import jwt

from protocol.topics import check_name

__all__ = ["LIFETIME", "AuthError", "RunTokens", "new_secret"]

ALGORITHM = "HS256"
#: Seconds a token is valid; a cached token is renewed when less than a fifth of this is left.
LIFETIME = 300.0


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
        self._cache: dict[str, tuple[str, float]] = {}

    def token(self, agent: str) -> str:
        """A token naming ``agent`` (cached until a fifth of its lifetime is left)."""
        now = time.time()
        cached = self._cache.get(agent)
        if cached is not None and cached[1] - now > self.lifetime / 5:
            return cached[0]
        check_name(agent, "agent name")
        exp = now + self.lifetime
        claims = {"sub": agent, "aud": self.audience, "iat": int(now), "exp": int(exp)}
        token = jwt.encode(claims, self._secret, algorithm=ALGORITHM)
        self._cache[agent] = (token, exp)
        return token

    def headers(self, agent: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(agent)}"}

    def caller(self, authorization: str | None) -> str:
        """The agent an ``Authorization`` header names; :class:`AuthError` if it names none."""
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
            return check_name(claims.get("sub"), "agent name")
        except ValueError:
            raise AuthError("the bearer token names no valid agent") from None
