"""The ``adapt-train`` loop: a model (from scratch or pretrained) and its learned rule, trained on streams of a
text file through ``PlasticLM`` (plastic layers in the loop, KV dropped between windows), checkpointed and
resumable to the same parameters."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapt_runtime.config import select_layers
from adapt_runtime.train.checkpoint import (
    TrainerState,
    load_train_config,
    load_trainer_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
    step_folders,
)
from adapt_runtime.train.config import PlasticityConfig
from adapt_runtime.train.data import heldout_streams, load_tokens, sample_streams
from adapt_runtime.train.forward import PlasticLM, down_shapes
from adapt_runtime.train.params import RuleParams


@dataclass(frozen=True)
class TrainConfig:
    """One training run (the CLI's flags; saved as ``train_config.json`` in every checkpoint).

    ``model`` None trains a Llama of ``n_layers`` x ``hidden`` (``heads``, ``kv_heads``, FFN ``ffn``) from scratch
    with ``tokenizer``'s vocabulary; otherwise it names a pretrained model (``llama``: the bundled stories260K).
    ``learn``: ``rule`` trains the rule's parameters only, ``all`` the base weights too. A stream of ``seq_len``
    tokens is read in windows of ``window`` tokens, the KV dropped between them.
    """

    data: str
    out: str
    model: str | None = None
    tokenizer: str = "llama"
    n_layers: int = 2
    hidden: int = 64
    heads: int = 4
    kv_heads: int | None = None
    ffn: int = 128
    form: str = "hebbian"
    target: str = "error"
    modulation: str = "none"
    alpha: bool = False
    eta_max: float = 0.2
    norm: str = "key"
    chunk_size: int = 32
    layers: str = "all"
    init_rate: float = 1.0
    init_decay: float = 0.99
    learn_decay: bool = True
    learn: str = "rule"
    steps: int = 100
    batch: int = 8
    seq_len: int = 256
    window: int = 128
    lr: float = 1e-3
    rule_lr: float = 1e-2
    grad_clip: float = 1.0
    holdout: float = 0.05
    eval_every: int = 0
    eval_streams: int = 8
    save_every: int = 0
    keep: int = 2
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.learn not in ("rule", "all"):
            raise ValueError(f"learn must be 'rule' or 'all', got {self.learn!r}")
        if self.window % self.chunk_size or self.seq_len % self.window:
            raise ValueError(
                f"window ({self.window}) must be a multiple of the chunk size ({self.chunk_size}) and "
                f"seq_len ({self.seq_len}) a multiple of the window"
            )
        if min(self.steps, self.batch, self.seq_len) < 1:
            raise ValueError("steps, batch and seq_len must be positive")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def scratch_model(cfg: TrainConfig, vocab_size: int, special: dict[str, int | None]) -> nn.Module:
    """A randomly initialised Llama of ``cfg``'s shape (seeded by the caller)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden,
        intermediate_size=cfg.ffn,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads or cfg.heads,
        max_position_embeddings=max(cfg.window, 16),
        tie_word_embeddings=True,
        **special,
    )
    return AutoModelForCausalLM.from_config(config).float()


def _model_and_tokenizer(cfg: TrainConfig, source: str | None):
    import adapt_runtime as ar

    if source is not None:
        return ar.load_model(source, dtype="float32")
    _, tokenizer = ar.load_model(cfg.tokenizer)
    special = {k: getattr(tokenizer, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return scratch_model(cfg, len(tokenizer), special), tokenizer


def _optimizer(plm: PlasticLM, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = [{"params": list(plm.rule.parameters()), "lr": cfg.rule_lr}]
    base = list(plm.model.parameters())
    for p in base:
        p.requires_grad_(cfg.learn == "all")
    if cfg.learn == "all":
        groups.append({"params": base, "lr": cfg.lr})
    return torch.optim.AdamW(groups, weight_decay=0.0)


@torch.no_grad()
def evaluate(plm: PlasticLM, streams: torch.Tensor, window: int, batch: int) -> dict[str, float]:
    """Mean next-token NLL of held-out ``streams`` with the learned rule writing (``plastic``) and without
    (``static``, S = 0)."""
    if not len(streams):
        return {}
    sums = {"plastic": 0.0, "static": 0.0}
    for k in range(0, len(streams), batch):
        ids = streams[k : k + batch]
        for name, adapt in (("plastic", True), ("static", False)):
            sums[name] += float(plm(ids, window=window, adapt=adapt).loss(ids)) * len(ids)
    return {name: total / len(streams) for name, total in sums.items()}


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True, log: Callable[[str], None] = print) -> Path:
    """Train (or, with ``resume``, continue from the newest checkpoint in ``cfg.out``); return the last checkpoint."""
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but CUDA is not available")
    start, trainer, source = 0, None, cfg.model
    if resume:
        found = step_folders(cfg.out)
        if not found:
            raise FileNotFoundError(f"--resume: no checkpoint (step-*) in {cfg.out}")
        source = str(found[-1][1])
        trainer = load_trainer_state(source)
        start = trainer.step
    torch.manual_seed(cfg.seed)
    model, tokenizer = _model_and_tokenizer(cfg, source)
    model = model.to(device).train()
    n_layers = model.config.num_hidden_layers
    if trainer is not None and source is not None:  # resumed: source is the checkpoint folder
        rule = RuleParams.load(source)
    else:
        plasticity = PlasticityConfig(
            form=cfg.form,
            target=cfg.target,
            modulation=cfg.modulation,
            alpha=cfg.alpha,
            eta_max=cfg.eta_max,
            norm=cfg.norm,
            chunk_size=cfg.chunk_size,
            layers=select_layers(cfg.layers, n_layers),
            init_rate=cfg.init_rate,
            init_decay=cfg.init_decay,
            learn_decay=cfg.learn_decay,
        )
        rule = RuleParams(plasticity, down_shapes(model, plasticity.layers))
    plm = PlasticLM(model, rule.to(device))
    optimizer = _optimizer(plm, cfg)
    sampler = torch.Generator().manual_seed(cfg.seed)
    if trainer is not None:
        optimizer.load_state_dict(trainer.optimizer)
        sampler.set_state(trainer.sampler)
        set_rng_state(trainer.rng)
    data = load_tokens(cfg.data, tokenizer, cfg.holdout)
    heldout = heldout_streams(data.heldout, cfg.seq_len, cfg.eval_streams).to(device)
    log(
        f"adapt-train: {sum(p.numel() for p in model.parameters())} model parameters, "
        f"{sum(p.numel() for p in rule.parameters())} rule parameters ({rule.config.form}, layers "
        f"{list(rule.config.layers)}); {len(data.train)} training tokens, {len(data.heldout)} held out"
    )
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start, unit="step", desc="adapt-train")
    last = None
    try:
        for step in range(start, cfg.steps):
            ids = sample_streams(data.train, cfg.batch, cfg.seq_len, sampler).to(device)
            loss = plm(ids, window=cfg.window).loss(ids)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                trained = [p for group in optimizer.param_groups for p in group["params"]]
                torch.nn.utils.clip_grad_norm_(trained, cfg.grad_clip)
            optimizer.step()
            done = step + 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}")
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"step {done}: the loss is {loss.item()}")
            if cfg.eval_every and done % cfg.eval_every == 0:
                scores = evaluate(plm.eval(), heldout, cfg.window, cfg.batch)
                plm.train()
                log(
                    f"step {done}: held-out NLL plastic {scores.get('plastic', math.nan):.4f} static "
                    f"{scores.get('static', math.nan):.4f}; {rule.summary()}"
                )
            if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps:
                state = TrainerState(done, optimizer.state_dict(), rng_state(), sampler.get_state())
                last = save_checkpoint(cfg.out, done, model, tokenizer, rule, state, cfg.to_dict(), cfg.keep)
    finally:
        if bar is not None:
            bar.close()
    if last is None:
        last = step_folders(cfg.out)[-1][1]
    log(f"adapt-train: checkpoint {last} (serve it: adapt-serve --model {last} --rule learned)")
    return last


def resume_config(out: str | Path, **overrides: Any) -> TrainConfig:
    """The saved config of the newest checkpoint in ``out``, with ``overrides`` (e.g. more ``steps``)."""
    found = step_folders(out)
    if not found:
        raise FileNotFoundError(f"--resume: no checkpoint (step-*) in {out}")
    cfg = TrainConfig.from_dict(load_train_config(found[-1][1]))
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
