"""The v2 front's hop to TorchServe: one keep-alive HTTP client (aiohttp: of the async clients, the cheapest hop per
request) for inference on /predictions and the management API's model listing; where each call goes comes from
``serving.torchserve``."""

from __future__ import annotations

import json

from ..torchserve import predictions_path, versions_path
from .tokens import Token


class Upstream:
    def __init__(self, inference_url: str, management_url: str, token: Token):
        self.inference_url, self.management_url, self.token = inference_url, management_url, token
        self.session = None

    async def call(self, method: str, url: str, body: bytes | None, headers: dict) -> tuple[int, dict, bytes]:
        """(status, headers by lowercase name, body); OSError when TorchServe does not answer."""
        import aiohttp

        if self.session is None:
            self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60, connect=5),
                                                 connector=aiohttp.TCPConnector(limit=256))
        try:
            async with self.session.request(method, url, data=body, headers=headers) as r:
                return r.status, {k.lower(): v for k, v in r.headers.items()}, await r.read()
        except (aiohttp.ClientError, TimeoutError) as e:
            raise OSError(f"{type(e).__name__}: {e}") from None

    async def predict(self, model: str, version: str | None, body: bytes, headers: dict) -> tuple[int, dict, bytes]:
        """An inference request to TorchServe's /predictions/NAME[/VERSION]: the handler answers it."""
        return await self.call("POST", self.inference_url + predictions_path(model, version), body, headers)

    async def versions(self, model: str) -> tuple[int, list | None]:
        """(status, TorchServe's record of every version of ``model`` with its workers)."""
        key = self.token.key("management")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        status, _, content = await self.call("GET", self.management_url + versions_path(model), None, headers)
        return status, json.loads(content) if status == 200 else None


def message(content: bytes) -> str:
    """What TorchServe (or the handler) said in a refusal."""
    answer = loads(content)
    return answer.get("message") or answer.get("error") or content[:300].decode(errors="replace")


def loads(content: bytes) -> dict:
    try:
        found = json.loads(content)
        return found if isinstance(found, dict) else {}
    except ValueError:
        return {}

