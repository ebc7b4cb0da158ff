"""A vendor's webhook endpoint for the tests (real HTTP, uvicorn in the test's event loop)."""

from __future__ import annotations

import json

from fastapi import FastAPI, Request, Response

from agents.ordertaking.webhooks import verify_signature
from registry.part2 import InLoopServer


class Receiver:
    """A vendor's webhook endpoint: verifies signatures, fails its first ``fail_first`` deliveries with
    ``fail_status``, and records what it acknowledged (by Twinbid-Event-Id)."""

    def __init__(self, secret: str, fail_first: int = 0, fail_status: int = 503) -> None:
        self.secret = secret
        self.fail_first = fail_first
        self.fail_status = fail_status
        self.calls = 0
        self.bad_signatures = 0
        self.acknowledged: dict[str, int] = {}
        self.events: list[dict] = []
        self.attempt_headers: dict[str, list[int]] = {}
        app = FastAPI()

        @app.post("/hook")
        async def hook(request: Request) -> Response:
            body = await request.body()
            self.calls += 1
            if not verify_signature(self.secret, body, request.headers.get("twinbid-signature")):
                self.bad_signatures += 1
                return Response(status_code=401)
            key = request.headers["twinbid-event-id"]
            self.attempt_headers.setdefault(key, []).append(int(request.headers["twinbid-delivery-attempt"]))
            if self.calls <= self.fail_first:
                return Response(status_code=self.fail_status)
            self.acknowledged[key] = self.acknowledged.get(key, 0) + 1
            self.events.append(json.loads(body))
            return Response(status_code=204)

        self.server = InLoopServer(app)
        self.url = ""

    async def start(self, port: int = 0) -> str:
        self.url = await self.server.start("127.0.0.1", port) + "/hook"
        return self.url

    async def stop(self) -> None:
        await self.server.stop()
