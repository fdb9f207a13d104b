"""``POST /v1/chat/completions``: messages through the chat template, then the same generation path."""

from __future__ import annotations

from adapt_runtime.serving.context import ServerContext, off_loop, text_size
from adapt_runtime.serving.edge.completions import sampling
from adapt_runtime.serving.edge.errors import APIError
from adapt_runtime.serving.edge.read_routes import split_long_prompt
from adapt_runtime.serving.edge.requests import principal_of, session_id_of
from adapt_runtime.serving.edge.responses import Generation, respond
from adapt_runtime.serving.edge.schemas import ChatCompletionRequest, ChatMessage
from adapt_runtime.serving.engine.detokenize import Detokenizer
from adapt_runtime.serving.engine.events import PromptScored, Token
from adapt_runtime.serving.engine.scheduler import Job
from adapt_runtime.serving.sessions.turn import Turn, start_turn
from fastapi import Request
from starlette.responses import Response


def chat_prompt(ctx: ServerContext, messages: list[ChatMessage], add_generation_prompt: bool) -> list[int]:
    """The token ids of ``messages`` through the chat template (chat completions and ``/tokenize``)."""
    text, add_special = ctx.template.render(messages, add_generation_prompt)
    return ctx.engine.encode(text, add_special_tokens=add_special)


async def create_chat_completion(ctx: ServerContext, request: Request, body: ChatCompletionRequest) -> Response:
    ctx.check_model(body.model)
    ids = await off_loop(text_size(body.messages), chat_prompt, ctx, body.messages, body.add_generation_prompt)
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    long = split_long_prompt(ctx, request, body, ids, requested)
    ids = ids if long is None else long.tail
    max_tokens = requested if requested is not None else max(ctx.engine.max_len - len(ids), 0)
    ctx.engine.check_length(len(ids), max_tokens)
    ctx.check_work(body.n, len(ids) + body.n * max_tokens)
    sid = session_id_of(request, body.session_id)
    if sid is not None and body.n > 1:
        raise APIError(400, "a session turn takes n = 1; fork the session for alternatives",
                       "invalid_session_request", "n")
    k = (body.top_logprobs or 0) if body.logprobs else None
    params = sampling(body, max_tokens, k)

    def plan(turn: Turn) -> list:
        if long is not None:
            long.prepare(turn)
        return [ctx.engine.plan(turn.state, ids, False, max_tokens)]

    turn, planned = await start_turn(ctx, principal_of(request), sid, body.adapt, plan)
    if long is not None and not await long.read(ctx, turn, request):
        return Response(status_code=499)
    job = Job(planned, body.n, params, body.adapt, ctx.engine.stop_ids(body.stop_token_ids, body.ignore_eos),
              emit=lambda _: None)
    fmt = ChatFormat(ctx.engine.detok, k)
    return await respond(Generation(ctx, turn, job, fmt, "chat"), request, body.stream, body.stream_options)


class ChatFormat:
    chunk_object = "chat.completion.chunk"
    final_object = "chat.completion"

    def __init__(self, detok: Detokenizer, top_logprobs: int | None) -> None:
        self.detok, self.k = detok, top_logprobs

    def _choice(self, index: int, delta: dict, logprobs: dict | None = None, finish: str | None = None) -> dict:
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

    def _item(self, token: int, logprob: float) -> dict:
        piece = self.detok.piece(token)
        return {"token": piece, "logprob": logprob, "bytes": list(piece.encode("utf-8"))}

    def opening(self, index: int) -> dict | None:
        return self._choice(index, {"role": "assistant", "content": ""})

    def echo(self, index: int, scored: PromptScored) -> dict | None:
        return None

    def token(self, event: Token) -> dict | None:
        if self.k is None:
            return self._choice(event.index, {"content": event.text}) if event.text else None
        item = self._item(event.token_id, event.logprob)
        item["top_logprobs"] = [self._item(t, v) for t, v in event.top]
        return self._choice(event.index, {"content": event.text}, {"content": [item]})

    def finish(self, index: int, reason: str) -> dict:
        return self._choice(index, {}, None, reason)

    def fold(self, index: int, parts: list[dict]) -> dict:
        text = "".join(p["delta"].get("content") or "" for p in parts)
        reason = next((p["finish_reason"] for p in parts if p["finish_reason"]), None)
        logprobs = None
        if self.k is not None:
            logprobs = {"content": [item for p in parts if p["logprobs"] for item in p["logprobs"]["content"]]}
        message = {"role": "assistant", "content": text}
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": reason}
