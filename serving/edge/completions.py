"""``POST /v1/completions``: prompts as a string, strings, token ids or lists of token ids; ``echo`` with
``logprobs`` gives len(prompt) + n entries whose top-1 values are exact (what lm-eval's ``local-completions``
scores with)."""

from __future__ import annotations

from typing import TypeGuard

from adapt_runtime.serving.context import ServerContext, off_loop, text_size
from adapt_runtime.serving.edge.errors import APIError
from adapt_runtime.serving.edge.read_routes import split_long_prompt
from adapt_runtime.serving.edge.requests import principal_of, session_id_of
from adapt_runtime.serving.edge.responses import Generation, respond
from adapt_runtime.serving.edge.schemas import ChatCompletionRequest, CompletionRequest, Prompts
from adapt_runtime.serving.engine.detokenize import Detokenizer
from adapt_runtime.serving.engine.events import PromptScored, Token
from adapt_runtime.serving.engine.sampling import SamplingParams
from adapt_runtime.serving.engine.scheduler import Job
from adapt_runtime.serving.sessions.turn import Turn, start_turn
from fastapi import Request
from starlette.responses import Response


def prompt_ids(ctx: ServerContext, prompt: Prompts) -> list[tuple[list[int], str | None]]:
    """Each prompt as (token ids, original text or None)."""
    engine = ctx.engine
    if isinstance(prompt, str):
        return [(engine.encode(prompt), prompt)]
    if _one_ids(prompt):
        return [(engine.check_ids(list(prompt)), None)]
    return [(engine.encode(p), p) if isinstance(p, str) else (engine.check_ids(list(p)), None)
            for p in prompt if isinstance(p, (str, list))]  # the schema allows no list mixing ids with prompts


def _one_ids(prompt: Prompts) -> TypeGuard[list[int]]:
    """Whether ``prompt`` is one prompt of token ids (the schema allows no list mixing ids and prompts)."""
    return not isinstance(prompt, str) and all(isinstance(p, int) for p in prompt)


def prompt_count(prompt: Prompts) -> int:
    """How many prompts ``prompt`` holds (a string or one list of token ids is one)."""
    return 1 if isinstance(prompt, str) or _one_ids(prompt) else len(prompt)


def sampling(body: CompletionRequest | ChatCompletionRequest, max_tokens: int, logprobs: int | None) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=max(body.top_k, 0),
        seed=body.seed, presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
        stop=tuple(body.stop or ()), stop_token_ids=tuple(body.stop_token_ids or ()), logprobs=logprobs,
    )


async def create_completion(ctx: ServerContext, request: Request, body: CompletionRequest) -> Response:
    ctx.check_model(body.model)
    if body.suffix:
        raise APIError(400, "suffix is not supported", "unsupported_parameter", "suffix")
    ctx.check_work(prompt_count(body.prompt) * body.n)
    prompts = await off_loop(text_size(body.prompt), prompt_ids, ctx, body.prompt)
    long = split_long_prompt(ctx, request, body, prompts[0][0], body.max_tokens) if len(prompts) == 1 else None
    prompts = prompts if long is None else [(long.tail, None)]
    longest = max(len(ids) for ids, _ in prompts)
    max_tokens = body.max_tokens if body.max_tokens is not None else max(ctx.engine.max_len - longest, 0)
    for ids, _ in prompts:
        ctx.engine.check_length(len(ids), max_tokens)
    choices = len(prompts) * body.n
    ctx.check_work(choices, sum(len(ids) for ids, _ in prompts) + choices * max_tokens)
    sid = session_id_of(request, body.session_id)
    if sid is not None and (len(prompts) > 1 or body.n > 1):
        raise APIError(400, "a session turn takes one prompt and n = 1; fork the session for alternatives",
                       "invalid_session_request", "n" if body.n > 1 else "prompt")
    params = sampling(body, max_tokens, body.logprobs)

    def plan(turn: Turn) -> list:
        if long is not None:
            long.prepare(turn)
        states = [turn.state] if turn.session_id is not None else [ctx.engine.rt.new_state() for _ in prompts]
        return [ctx.engine.plan(s, ids, body.echo, max_tokens) for s, (ids, _) in zip(states, prompts)]

    turn, planned = await start_turn(ctx, principal_of(request), sid, body.adapt, plan)
    if long is not None and not await long.read(ctx, turn, request):
        return Response(status_code=499)
    job = Job(planned, body.n, params, body.adapt, ctx.engine.stop_ids(body.stop_token_ids, body.ignore_eos),
              emit=lambda _: None)
    fmt = CompletionFormat(ctx.engine.detok, prompts, body.echo, body.logprobs)
    return await respond(Generation(ctx, turn, job, fmt, "completions"), request, body.stream,
                         body.stream_options)


class CompletionFormat:
    chunk_object = "text_completion"
    final_object = "text_completion"

    def __init__(self, detok: Detokenizer, prompts: list[tuple[list[int], str | None]], echo: bool,
                 logprobs: int | None) -> None:
        self.detok, self.prompts, self.echo_on, self.k = detok, prompts, echo, logprobs
        self.offsets: dict[int, int] = {}

    def _choice(self, index: int, text: str, logprobs: dict | None, finish: str | None = None) -> dict:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def _entry(self, token: int, logprob: float | None, top: list[tuple[int, float]] | None, index: int) -> dict:
        piece = self.detok.piece(token)
        offset = self.offsets.get(index, 0)
        self.offsets[index] = offset + len(piece)
        top_map = None
        if top is not None:
            top_map = {self.detok.piece(t): v for t, v in top}
            if logprob is not None:
                top_map.setdefault(piece, logprob)
        return {"tokens": [piece], "token_logprobs": [logprob], "top_logprobs": [top_map], "text_offset": [offset]}

    def opening(self, index: int) -> dict | None:
        return None

    def echo(self, index: int, scored: PromptScored) -> dict | None:
        if not self.echo_on:
            return None
        tokens, prompt_text = self.prompts[scored.prompt_index]
        text = prompt_text if prompt_text is not None else self.detok.decode(tokens)
        logprobs = None
        if self.k is not None:
            entries = [self._entry(t, None if s is None else s[0], None if s is None else s[1], index)
                       for t, s in zip(tokens, scored.logprobs or [None] * len(tokens))]
            logprobs = _merge(entries)
        return self._choice(index, text, logprobs)

    def token(self, event: Token) -> dict | None:
        if self.k is None:
            return self._choice(event.index, event.text, None) if event.text else None
        entry = self._entry(event.token_id, event.logprob, event.top, event.index)
        return self._choice(event.index, event.text, entry)

    def finish(self, index: int, reason: str) -> dict:
        return self._choice(index, "", None, reason)

    def fold(self, index: int, parts: list[dict]) -> dict:
        text = "".join(p["text"] for p in parts)
        reason = next((p["finish_reason"] for p in parts if p["finish_reason"]), None)
        logprobs = None
        if self.k is not None:
            logprobs = _merge([p["logprobs"] for p in parts if p["logprobs"]])
        return self._choice(index, text, logprobs, reason)


def _merge(entries: list[dict]) -> dict:
    keys = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
    return {key: [v for entry in entries for v in entry[key]] for key in keys}
