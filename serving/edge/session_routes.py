"""``/v1/sessions``: create, list, get, delete, reset, fork, and export/import of the state as safetensors."""

from __future__ import annotations

import asyncio
import re
from typing import Annotated

from adapt_runtime.serving.edge.requests import ctx_of, principal_of
from adapt_runtime.serving.edge.schemas import SessionCreateRequest
from adapt_runtime.serving.sessions.files import decode_state
from fastapi import APIRouter, Body, Request
from starlette.responses import JSONResponse, Response

router = APIRouter()
STATE_MEDIA_TYPE = "application/octet-stream"


STATE_ROUTE = re.compile(r"/v1/sessions/[^/]+/state")


def is_state_route(path: str) -> bool:
    """True for ``/v1/sessions/{id}/state`` alone: the one route whose body may be a whole state file (the
    larger body limit applies to it, every other path keeps ``--max-request-bytes``)."""
    return STATE_ROUTE.fullmatch(path) is not None


@router.post("/v1/sessions", status_code=201)
async def create_session(request: Request,
                         body: Annotated[SessionCreateRequest | None, Body()] = None) -> JSONResponse:
    ctx = ctx_of(request)
    session = await ctx.store.create(principal_of(request), (body.metadata if body else None))
    return JSONResponse(session.info(), status_code=201)


@router.get("/v1/sessions")
async def list_sessions(request: Request) -> dict:
    sessions = ctx_of(request).store.list(principal_of(request))
    return {"object": "list", "data": [s.info() for s in sessions]}


@router.get("/v1/sessions/{session_id}")
async def get_session(request: Request, session_id: str) -> dict:
    return ctx_of(request).store.get(principal_of(request), session_id).info()


@router.delete("/v1/sessions/{session_id}")
async def delete_session(request: Request, session_id: str) -> dict:
    store = ctx_of(request).store
    await store.delete(store.get(principal_of(request), session_id))
    return {"id": session_id, "object": "session.deleted", "deleted": True}


@router.post("/v1/sessions/{session_id}/reset")
async def reset_session(request: Request, session_id: str) -> dict:
    ctx = ctx_of(request)
    session = ctx.store.get(principal_of(request), session_id)
    await ctx.store.acquire(session)
    try:
        await ctx.store.commit(session, ctx.engine.rt.new_state(), turn=False)
    finally:
        ctx.store.release(session)
    return session.info()


@router.post("/v1/sessions/{session_id}/fork", status_code=201)
async def fork_session(request: Request, session_id: str) -> JSONResponse:
    ctx = ctx_of(request)
    owner = principal_of(request)
    source = ctx.store.get(owner, session_id)
    state = await ctx.store.acquire(source)
    try:
        copy = state.clone()
    finally:
        ctx.store.release(source)
    metadata = {**source.record.metadata, "forked_from": source.id}
    fork = await ctx.store.create(owner, dict(list(metadata.items())[:16]), state=copy)
    return JSONResponse(fork.info(), status_code=201)


@router.get("/v1/sessions/{session_id}/state", response_class=Response)
async def export_state(request: Request, session_id: str) -> Response:
    ctx = ctx_of(request)
    session = ctx.store.get(principal_of(request), session_id)
    state = await ctx.store.acquire(session)
    try:
        data = await asyncio.to_thread(state.to_bytes)
    finally:
        ctx.store.release(session)
    disposition = f'attachment; filename="{session.id}.safetensors"'
    return Response(data, media_type=STATE_MEDIA_TYPE, headers={"Content-Disposition": disposition})


@router.put("/v1/sessions/{session_id}/state")
async def import_state(request: Request, session_id: str) -> dict:
    ctx = ctx_of(request)
    session = ctx.store.get(principal_of(request), session_id)
    state = await asyncio.to_thread(decode_state, await request.body(), ctx.engine.rt)  # checks every tensor
    return await replace_state(ctx.store, session, state)


async def replace_state(store, session, state) -> dict:
    """Make ``state`` the session's, as one committed non-turn change (durable before it answers)."""
    await store.acquire(session)
    try:
        await store.commit(session, state, turn=False)
    finally:
        store.release(session)
    return session.info()
