"""A running ``vllm serve`` as the vLLM engine's generator (``adapt-serve --engine vllm --vllm-url URL``).

The server is the user's own: started with LoRA on (``--enable-lora --max-lora-rank R``) and runtime adapter loading
allowed (``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``), serving the same model folder as ``--model``. Each generation's
adapter version is loaded by name through ``POST /v1/load_lora_adapter`` (vLLM reads the folder, so it must see
``--vllm-adapter-dir``: the same machine's tmpfs by default, or a shared mount), generated with by naming it as the
request's ``model`` on ``POST /v1/completions`` (prompt as token ids, streamed, token ids and logprobs returned as
ids), and unloaded through ``POST /v1/unload_lora_adapter`` when its generation ends. A server that cannot be
reached fails the request with 503 and Retry-After; it is never restarted from here.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING

import httpx
from adapt_runtime.serving.engine.vllm_engine import Entry, Piece, VllmSetupError
from adapt_runtime.serving.failures import Unavailable
from adapt_runtime.serving.types import JsonObject

if TYPE_CHECKING:
    from adapt_runtime.serving.engine.vllm_engine import Adapter

CONNECT_S = 10.0
ID_PREFIX = "token_id:"  # vLLM's form of a token in logprobs with return_tokens_as_token_ids


def _token(text: str) -> int:
    return int(text.removeprefix(ID_PREFIX))


def entries(logprobs: JsonObject | None, count: int) -> list[Entry] | None:
    """The ``count`` new positions' entries of a completions chunk's ``logprobs`` (ids as ``token_id:N``)."""
    if logprobs is None:
        return None
    tops = logprobs.get("top_logprobs") or []
    chosen = zip(logprobs.get("tokens") or [], logprobs.get("token_logprobs") or [])
    out: list[Entry] = []
    for top, (token, value) in zip(tops, chosen):
        entry: Entry = {_token(tok): (float(lp), None) for tok, lp in (top or {}).items()}
        entry.setdefault(_token(token), (float(value), None))
        out.append(entry)
    return out if len(out) == count else None


class RemoteVllm:
    """A ``Generator`` (``vllm_engine``) over a ``vllm serve`` HTTP API."""

    def __init__(self, url: str, model: str, client: httpx.AsyncClient) -> None:
        self.url, self.model, self.client = url.rstrip("/"), model, client

    @classmethod
    def connect(cls, url: str, max_len: int) -> RemoteVllm:
        """Check the server answers and serves a context of at least ``max_len``; one line why not."""
        base = url.rstrip("/")
        try:
            listed = httpx.get(f"{base}/v1/models", timeout=CONNECT_S)
            listed.raise_for_status()
            models = listed.json()["data"]
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            raise VllmSetupError(f"--vllm-url {url}: no vLLM server answers /v1/models ({exc})") from None
        if not models:
            raise VllmSetupError(f"--vllm-url {url}: the server lists no model")
        model = models[0]
        served = model.get("max_model_len")
        if isinstance(served, int) and served < max_len:
            raise VllmSetupError(f"--vllm-url {url}: the server's context is {served} tokens, below this server's "
                                 f"{max_len}; pass --max-model-len {served} or start vLLM with a longer one")
        client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=CONNECT_S))
        return cls(base, str(model["id"]), client)

    @property
    def errored(self) -> bool:
        return False

    async def _post(self, path: str, body: JsonObject) -> None:
        try:
            answer = await self.client.post(f"{self.url}{path}", json=body)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        if answer.status_code >= 400:
            raise RuntimeError(f"vLLM {path} answered {answer.status_code}: {answer.text[:300]}")

    def _unreachable(self, exc: Exception) -> Unavailable:
        return Unavailable(f"the vLLM server at {self.url} is unreachable ({type(exc).__name__}); retry shortly",
                           "engine_unavailable", retry_after=5)

    async def generate(self, prompt: list[int], settings: JsonObject, request_id: str, adapter: Adapter | None
                       ) -> AsyncGenerator[Piece, None]:
        if adapter is not None:  # the server loads this version by name from its folder
            try:
                await self._post("/v1/load_lora_adapter", {"lora_name": adapter.name,
                                                           "lora_path": str(adapter.folder)})
            except RuntimeError as exc:
                raise RuntimeError(f"{exc} (is vLLM started with --enable-lora, --max-lora-rank and "
                                   "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, and can it read the adapter folder?)"
                                   ) from None
        body = {**{k: v for k, v in settings.items() if k != "n" and v is not None},
                "model": self.model if adapter is None else adapter.name, "prompt": prompt, "stream": True,
                "return_token_ids": True, "return_tokens_as_token_ids": True, "request_id": request_id}
        try:
            async with self.client.stream("POST", f"{self.url}/v1/completions", json=body) as answer:
                if answer.status_code >= 400:
                    text = (await answer.aread()).decode(errors="replace")
                    raise RuntimeError(f"vLLM /v1/completions answered {answer.status_code}: {text[:300]}")
                async for line in answer.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    choices = json.loads(line[len("data: "):]).get("choices") or []
                    if not choices:
                        continue
                    choice = choices[0]
                    ids = [int(t) for t in choice.get("token_ids") or []]
                    yield Piece(ids, entries(choice.get("logprobs"), len(ids)) if settings.get("logprobs") is not None
                                else None, choice.get("finish_reason"))
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None

    async def drop(self, adapter: Adapter) -> None:
        await self._post("/v1/unload_lora_adapter", {"lora_name": adapter.name})

    def shutdown(self) -> None:
        """Nothing of the server is ours; the client's connections close with the process."""
