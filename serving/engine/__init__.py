"""The engine: turning prompts into tokens and memory, behind one interface (``interface.EngineProtocol``).

It owns the native engine (``native``: the runtime, its tokenizer and the model thread), the scheduler that batches
every job's model calls on that thread (``scheduler``), prompt reading in bounded pieces (``prompt_reader``),
per-row sampling (``sampling``), incremental detokenizing with stop strings (``detokenize``), the events a job
yields (``events``), and the vLLM engine that plugs into the same interface (``vllm_engine``; its tokens from vLLM
in this process or from a ``vllm serve`` over HTTP, ``vllm_remote``: a client of vLLM's API, not an HTTP edge).
Failures are raised as the domain errors of ``serving.failures``.
"""
