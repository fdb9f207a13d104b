"""``/v1/sessions/{id}/adapter``: a session's memory as a PEFT LoRA adapter (a zip of the adapter directory), and a
session seeded from one.

``GET ?rank=r`` exports the session's fast weights (exact without ``rank``; the best rank-r adapter with it; the
rank and per-layer relative error come back in ``X-Adapter-Rank`` and the weights file's metadata). ``PUT`` with a
zip body replaces the session's state by a fresh one whose S is the adapter's ``(alpha/r) B A``: 400 for a body
that is not a zip holding a well-formed PEFT LoRA adapter, 409 for an adapter made for another base model, other
modules or layers, or with options a fast-weight delta cannot represent; the old state is then unchanged. Both
follow the state routes: the session must belong to the caller (404 otherwise), one turn at a time (409 busy).
"""

from __future__ import annotations

import asyncio
import io
import lzma
import re
import struct
import zipfile
import zlib
from typing import TYPE_CHECKING, Annotated

from adapt_runtime.serving.edge.errors import APIError
from adapt_runtime.serving.edge.requests import ctx_of, principal_of
from adapt_runtime.serving.edge.session_routes import replace_state
from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from adapt_runtime.lora import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    LoraFormatError,
    LoraIncompatibleError,
    lora_files,
    lora_from_files,
)

if TYPE_CHECKING:
    from adapt_runtime.runtime import Runtime
    from adapt_runtime.state import FastWeights

router = APIRouter()
ADAPTER_MEDIA_TYPE = "application/zip"
ADAPTER_ROUTE = re.compile(r"/v1/sessions/[^/]+/adapter")


def is_adapter_route(path: str) -> bool:
    """True for ``/v1/sessions/{id}/adapter``, whose body may be a whole full-rank adapter (the state limit)."""
    return ADAPTER_ROUTE.fullmatch(path) is not None


def adapter_bytes_bound(rt: Runtime) -> int:
    """An upper bound on an adapter's files: full-rank float32 factors of every plastic layer, twice, plus 1 MiB."""
    return 2 * sum((d + f) * min(d, f) * 4 for d, f in rt.state_spec.shapes) + 2**20


def zip_adapter(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


# What reading a damaged or hostile zip can raise: bad headers (BadZipFile, struct.error, ValueError), a damaged
# deflate, bzip2 or LZMA stream (zlib.error, OSError, LZMAError), a truncated one (EOFError), an unknown method
# (NotImplementedError) or the encryption flag (RuntimeError, "password required"); each is a bad archive, a 400.
_BAD_ZIP = (zipfile.BadZipFile, struct.error, ValueError, OSError, EOFError, RuntimeError, zlib.error,
            lzma.LZMAError)


def _invalid(message: str) -> APIError:
    return APIError(400, message, "invalid_adapter")


def unzip_adapter(data: bytes, limit: int) -> tuple[bytes, bytes]:
    """The adapter's config and weights from a zip (at its root or in one folder), each read to at most ``limit``
    bytes whatever the zip's headers claim."""
    if not data:
        raise _invalid("the body is empty; send a zip of a PEFT LoRA adapter directory")
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        entries = [info for info in archive.infolist() if not info.is_dir()]
    except _BAD_ZIP as err:
        raise _invalid(f"the body is not a zip archive: {err}") from None
    found: dict[str, zipfile.ZipInfo] = {}
    for info in entries:
        folder, _, base = info.filename.rpartition("/")
        if base in (CONFIG_NAME, WEIGHTS_NAME) and folder.count("/") == 0:
            if base in found:
                raise _invalid(f"the zip holds more than one {base}")
            found[base] = info
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if name not in found]
    if missing:
        raise _invalid(f"the zip lacks {' and '.join(missing)} (a PEFT LoRA adapter directory, safetensors weights)")
    if found[CONFIG_NAME].filename.rpartition("/")[0] != found[WEIGHTS_NAME].filename.rpartition("/")[0]:
        raise _invalid(f"{CONFIG_NAME} and {WEIGHTS_NAME} are in different folders of the zip")
    out = []
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        try:
            with archive.open(found[name]) as member:
                content = member.read(limit + 1)
        except _BAD_ZIP as err:
            raise _invalid(f"cannot read {name} from the zip (a damaged archive): {err}") from None
        if len(content) > limit:
            raise APIError(413, f"{name} unpacks to more than {limit} bytes, larger than any adapter of this model",
                           "request_too_large")
        out.append(content)
    return out[0], out[1]


def decode_adapter(data: bytes, rt: Runtime) -> FastWeights:
    """A zip body -> a fresh state for ``rt``: 400 malformed, 409 made for something else, 413 too large."""
    config, weights = unzip_adapter(data, adapter_bytes_bound(rt))
    try:
        return lora_from_files(rt, config, weights)
    except LoraIncompatibleError as err:
        raise APIError(409, str(err), "adapter_incompatible") from None
    except LoraFormatError as err:
        raise _invalid(str(err)) from None


@router.get("/v1/sessions/{session_id}/adapter", response_class=Response)
async def export_adapter(request: Request, session_id: str,
                         rank: Annotated[int | None, Query(ge=1, le=65536)] = None) -> Response:
    ctx = ctx_of(request)
    session = ctx.store.get(principal_of(request), session_id)
    state = await ctx.store.acquire(session)
    try:
        export = await asyncio.to_thread(lora_files, ctx.engine.rt, state, rank)
    finally:
        ctx.store.release(session)
    headers = {"Content-Disposition": f'attachment; filename="{session.id}-adapter.zip"',
               "X-Adapter-Rank": str(export.rank)}
    return Response(zip_adapter(export.files), media_type=ADAPTER_MEDIA_TYPE, headers=headers)


@router.put("/v1/sessions/{session_id}/adapter")
async def import_adapter(request: Request, session_id: str) -> dict:
    ctx = ctx_of(request)
    session = ctx.store.get(principal_of(request), session_id)
    state = await asyncio.to_thread(decode_adapter, await request.body(), ctx.engine.rt)
    return await replace_state(ctx.store, session, state)
