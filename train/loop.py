"""The training loop: next-token prediction with AdamW (or Muon), warmup + cosine decay, accumulation.

One step: ``accum`` micro-batches of random windows (``inputs = tokens[i:i+T]``,
``targets = tokens[i+1:i+T+1]``), mean cross-entropy, backward (the gradient all-reduce only
on the last micro-batch), clip, optimizer step (``train/optim.py``: AdamW, or Muon for the
hidden matrices and AdamW for the rest; every group follows the same warmup and decay shape
from its own peak). With ``doc_mask`` each window is masked so attention and positions restart
at every ``<|endoftext|>`` (``document_layout``). Every ``eval_interval`` steps: train and val loss
and perplexity on fixed windows, a few samples, the loss plot, and a checkpoint.

Exact resume: the checkpoint holds the model, optimizer, the torch RNG (dropout), and the
window sampler's generator, and evaluation consumes no randomness, so a resumed CPU run
reproduces the uninterrupted run's losses bit for bit.

``_train`` reads as the run's steps, top to bottom: start (``startup``: what it continues from,
its tokenizer, corpus and architecture), build, restore, then evaluate / step / log until the
budget is spent. The schedule is ``schedule``'s, the log ``metrics_log``'s, the evaluation
``validation``'s; nothing here parses flags or settles settings (``settings``).
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from nextoken.errors import UserError
from nextoken.fileio import atomic_write_text
from nextoken.train import distributed as D
from nextoken.train.checkpoint import load_train_state, load_weights, prune_checkpoints, save_checkpoint
from nextoken.train.config import GPTConfig, TrainConfig
from nextoken.train.data import TokenData, WindowSampler, model_inputs
from nextoken.train.metrics_log import MetricsLog, peak_flops
from nextoken.train.model import GPT
from nextoken.train.optim import build_optimizer
from nextoken.train.run import resolve_device
from nextoken.train.schedule import set_learning_rates
from nextoken.train.startup import (
    Start,
    find_start,
    prepare_tokenizer_and_data,
    record_resumed_settings,
    settle_model,
)
from nextoken.train.tokenizer import document_token_id
from nextoken.train.validation import evaluate, overfit_start, sample_texts


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name == "float16" and device.type != "cuda":
        raise UserError("float16 training needs CUDA (it uses a gradient scaler); use bfloat16 on CPU",
                        flag="--dtype")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def train(cfg: TrainConfig, *, quiet: bool = False) -> dict[str, Any]:
    """Run (or resume) a training run; returns the summary also written to ``summary.json``."""
    device = resolve_device(cfg.device)
    info = D.init_distributed(device.type)
    try:
        summary = _train(cfg, device, info, quiet)
    except BaseException:
        D.shutdown(info, clean=False)
        raise
    D.shutdown(info)
    return summary


def _train(cfg: TrainConfig, device: torch.device, info: D.DistInfo, quiet: bool) -> dict[str, Any]:
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if info.is_main and not quiet else (lambda msg: None)
    dtype = _configure_torch(cfg, device)  # before any work, so a bad --dtype fails at once
    run_dir = Path(cfg.out_dir)
    start = find_start(cfg, run_dir, say)
    tok, data = prepare_tokenizer_and_data(cfg, run_dir, info, start, say, quiet=quiet)
    eot_id = document_token_id(tok, run_dir)
    if cfg.doc_mask and eot_id is None:
        raise UserError("the tokenizer has no <|endoftext|> token to find document boundaries by", flag="--doc-mask")
    mcfg, run_config = settle_model(cfg, run_dir, tok, start, info)
    rig = _build(cfg, mcfg, device, dtype, info, start)
    accum, tokens_per_step = _accumulation(cfg, info, say)
    sampler = WindowSampler(data.train, cfg.block_size, cfg.batch_size, seed=cfg.seed + 1000 * info.rank)
    progress = _restore(cfg, rig, sampler, info)
    if rig.state:
        say(f"resuming from {start.resume_path} at step {progress.step}")
    if info.is_main and start.saved_config is not None:
        record_resumed_settings(run_dir, start.saved_config, run_config)
    gqa = f" ({mcfg.n_kv_head} key/value)" if mcfg.n_kv_head != mcfg.n_head else ""
    say(f"model: {mcfg.arch}, {rig.raw.num_params() / 1e6:.2f}M parameters ({mcfg.n_layer} layers, {mcfg.n_head} "
        f"heads{gqa}, "
        f"{mcfg.n_embd} wide, context {mcfg.block_size}); {tokens_per_step:,} tokens/step ({accum} micro-step(s) x "
        f"{info.world_size} rank(s)); device {device}, {str(dtype).removeprefix('torch.')}")

    loop = Loop(cfg, info, device, quiet, run_dir, mcfg, tok, data, eot_id, rig, sampler, progress)
    while True:
        out_of_time = loop.out_of_time()  # every iteration: under torchrun it is a collective
        final = progress.step >= cfg.max_iters or out_of_time
        if progress.step % cfg.eval_interval == 0 or final:
            loop.evaluate()
        if final:
            break
        loop.step(accum, tokens_per_step)
    return loop.finish()


def _configure_torch(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    """Threads and TF32 for this process; the training dtype (a bad --dtype raises here)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return resolve_dtype(cfg.dtype, device)


@dataclass
class Rig:
    """What trains: the bare model, its wrapped (DDP/FSDP, compiled) form, the optimizer and the precision."""

    raw: GPT  # the bare model the optimizer holds (wrapping and compiling keep its parameters)
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    autocast: Any  # torch.autocast, or a null context in float32
    scaler: torch.amp.GradScaler
    state: dict[str, Any]  # the resumed checkpoint's training state ({} for a fresh start)


def _build(cfg: TrainConfig, mcfg: GPTConfig, device: torch.device, dtype: torch.dtype, info: D.DistInfo,
           start: Start) -> Rig:
    # The same initial weights on every rank: DDP would broadcast rank 0's anyway, but FSDP2
    # shards each rank's own copy, so per-rank seeds here would stitch two inits together.
    torch.manual_seed(cfg.seed)
    raw = GPT(mcfg)
    if info.rank:  # dropout differs between ranks (rank 0, and one process, keep the seed's stream)
        torch.manual_seed(cfg.seed + info.rank)
    raw.activation_checkpointing = cfg.activation_checkpointing
    state: dict[str, Any] = {}
    if start.resume_path is not None:
        load_weights(start.resume_path, raw, verify=False)
        state = load_train_state(start.resume_path)
    elif start.init is not None:
        raw.load_state_dict(start.init.state_dict)
    raw.to(device)
    model = D.wrap_model(raw, info, cfg.strategy, device)
    optimizer = build_optimizer(raw, optimizer=cfg.optimizer, learning_rate=cfg.learning_rate,
                                weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2), device_type=device.type,
                                muon_lr=cfg.muon_lr, muon_momentum=cfg.muon_momentum, muon_ns_steps=cfg.muon_ns_steps,
                                fused_adamw=cfg.fused_adamw)
    if state:
        D.load_optimizer_state(model, optimizer, state["optimizer"], info, cfg.strategy)
    if cfg.compile:
        model = torch.compile(model)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    return Rig(raw, model, optimizer, autocast, scaler, state)


def _accumulation(cfg: TrainConfig, info: D.DistInfo, say: Callable[[str], None]) -> tuple[int, int]:
    """Micro-steps per optimizer step, and the tokens one step trains on."""
    micro_tokens = cfg.batch_size * cfg.block_size * info.world_size
    accum = max(1, round(cfg.tokens_per_step / micro_tokens)) if cfg.tokens_per_step else 1
    if cfg.tokens_per_step and cfg.tokens_per_step % micro_tokens:
        say(f"note: --tokens-per-step {cfg.tokens_per_step} is not a multiple of batch x block x world "
            f"({micro_tokens}); using {accum * micro_tokens} ({accum} micro-steps)")
    return accum, accum * micro_tokens


@dataclass
class Progress:
    """Where the run stands: what a checkpoint records besides the weights, the optimizer and the RNGs."""

    step: int = 0
    tokens_seen: int = 0
    train_time: float = 0.0  # seconds spent in training steps; evaluations and checkpoints excluded
    val_history: list[tuple[int, float, float]] = field(default_factory=list)  # (step, train_loss, val_loss)


def _restore(cfg: TrainConfig, rig: Rig, sampler: WindowSampler, info: D.DistInfo) -> Progress:
    """The resumed checkpoint's progress, RNGs and sampler position (a fresh start: step 0)."""
    state = rig.state
    if not state:
        return Progress()
    progress = Progress(int(state["step"]), int(state["tokens_seen"]), float(state["train_time"]),
                        [tuple(v) for v in state.get("val_history", [])])
    samplers = state["sampler"]
    if len(samplers) == info.world_size:
        torch.set_rng_state(state["rng"][info.rank])
        sampler.load_state_dict(samplers[info.rank])
    else:  # a different world size: fresh, distinct streams that depend on where we resume
        sampler.generator.manual_seed(cfg.seed + 1000 * info.rank + progress.step)
        torch.manual_seed(cfg.seed + info.rank + progress.step)
    if "scaler" in state and rig.scaler.is_enabled():
        rig.scaler.load_state_dict(state["scaler"])
    return progress


class Loop:
    """The loop's moves (evaluate, step, log) over one run's state, and the summary at the end."""

    def __init__(self, cfg: TrainConfig, info: D.DistInfo, device: torch.device, quiet: bool, run_dir: Path,
                 mcfg: GPTConfig, tok: Any, data: TokenData, eot_id: int | None, rig: Rig, sampler: WindowSampler,
                 progress: Progress) -> None:
        self.cfg, self.info, self.device, self.quiet, self.run_dir = cfg, info, device, quiet, run_dir
        self.mcfg, self.tok, self.data, self.eot_id = mcfg, tok, data, eot_id
        self.rig, self.sampler, self.progress = rig, sampler, progress
        self.start_step = progress.step if rig.state else None  # the checkpoint resumed from is this step's
        self.log = MetricsLog(run_dir, info.is_main, cfg.tensorboard, self.start_step)
        self.flops_per_token = mcfg.flops_per_token(cfg.block_size)
        self.peak = peak_flops(device)
        self.bar = tqdm(total=cfg.max_iters, initial=progress.step, desc="training", unit="step", dynamic_ncols=True,
                        disable=not (info.is_main and cfg.progress and not quiet), file=sys.stderr)
        self.window_tokens, self.window_time = 0, 0.0  # since the last train record
        self.loss_acc = torch.zeros((), device=device)
        self.overfitting_since: int | None = None
        self.last_losses: dict[str, float] | None = None
        self.stopped_by_time = False
        self.t_step = time.perf_counter()

    def _clock(self) -> None:
        """Count the time since ``t_step`` as training (the callers exclude evaluation from it)."""
        now = time.perf_counter()
        self.window_time += now - self.t_step
        self.progress.train_time += now - self.t_step
        self.t_step = now

    def out_of_time(self) -> bool:
        cfg, info = self.cfg, self.info
        out = bool(cfg.max_time) and self.progress.train_time >= cfg.max_time
        if cfg.max_time and info.enabled:
            # Clocks differ between ranks; a rank that stopped alone would leave the others
            # waiting in the next all-reduce, so all stop when any is out of time.
            out = D.any_rank(out, info)
        self.stopped_by_time = out
        return out

    def evaluate(self) -> None:
        """Losses on fixed windows, samples, the plot and a checkpoint; training time stops meanwhile."""
        cfg, info, p = self.cfg, self.info, self.progress
        self._clock()  # steps since the last log count as training time; evaluation does not
        losses = evaluate(self.rig.model, self.data, cfg, self.device, self.rig.autocast, info, self.eot_id)
        self.last_losses = losses
        if not p.val_history or p.val_history[-1][0] != p.step:
            p.val_history.append((p.step, losses["train"], losses["val"]))
        rec = {"event": "eval", "step": p.step, "train_loss": losses["train"], "val_loss": losses["val"],
               "train_ppl": math.exp(min(losses["train"], 50)), "val_ppl": math.exp(min(losses["val"], 50)),
               "tokens_seen": p.tokens_seen, "train_time": p.train_time}
        self.log.write(rec)
        self.overfitting_since = overfit_start(p.val_history, cfg.overfit_patience)
        samples = []
        if cfg.sample_tokens and (info.is_main or cfg.strategy == "fsdp"):
            samples = sample_texts(D.unwrap(self.rig.model), self.tok, cfg, self.device, p.step, eot_id=self.eot_id)
        if info.is_main:
            bar = self.bar
            bar.write(f"step {p.step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f} "
                      f"(ppl {rec['val_ppl']:.2f})") if not self.quiet else None
            for s in samples:
                self.log.write({"event": "sample", "step": p.step, "text": s})
            if self.overfitting_since is not None and not self.quiet:
                bar.write(f"warning: val loss has risen for {cfg.overfit_patience} evaluations since step "
                          f"{self.overfitting_since} while train loss fell: the model is overfitting")
            from nextoken.train.plots import plot_loss  # matplotlib: only once there is something to plot

            plot_loss(self.log.records, self.run_dir / "loss.png", self.mcfg.vocab_size, log_scale=cfg.plot_log_scale)
        if p.step != self.start_step:
            self.checkpoint(losses)
        self.t_step = time.perf_counter()

    def checkpoint(self, losses: dict[str, float] | None) -> None:
        """Weights, optimizer, every rank's RNG and sampler, and the progress: all an exact resume needs."""
        cfg, info, rig, p = self.cfg, self.info, self.rig, self.progress
        model_state = D.full_model_state(rig.model, info, cfg.strategy)  # collective under FSDP
        optim_state = D.full_optimizer_state(rig.model, rig.optimizer, info, cfg.strategy)
        rngs = D.all_gather_object(torch.get_rng_state(), info)
        samplers = D.all_gather_object(self.sampler.state_dict(), info)
        if not info.is_main:
            return
        train_state = {"step": p.step, "optimizer": optim_state, "rng": rngs, "sampler": samplers,
                       "tokens_seen": p.tokens_seen, "train_time": p.train_time,
                       "val_history": [list(v) for v in p.val_history]}
        if rig.scaler.is_enabled():
            train_state["scaler"] = rig.scaler.state_dict()
        meta = {"tokens_seen": p.tokens_seen, "train_time": p.train_time, "world_size": info.world_size,
                "train_loss": losses["train"] if losses else None, "val_loss": losses["val"] if losses else None}
        ckpt_root = self.run_dir / "checkpoints"
        save_checkpoint(ckpt_root, p.step, model_state, train_state, meta, tied=rig.raw.tied)
        prune_checkpoints(ckpt_root, cfg.keep_last)

    def step(self, accum: int, tokens_per_step: int) -> None:
        """One optimizer step over ``accum`` micro-batches; a train record every ``log_interval`` steps."""
        cfg, info, rig, p, device = self.cfg, self.info, self.rig, self.progress, self.device
        time_fraction = None
        if cfg.lr_schedule == "time":
            elapsed = p.train_time + (time.perf_counter() - self.t_step)  # training seconds, evaluation excluded
            # every rank must step with the same learning rate: take the clock furthest along
            time_fraction = D.max_over_ranks(elapsed, info) / cfg.max_time if cfg.max_time else 0.0
        lr = set_learning_rates(rig.optimizer, p.step, cfg, time_fraction)
        for micro in range(accum):
            x, y = self.sampler.next_batch()
            extra = {k: v.to(device, non_blocking=True) for k, v in model_inputs(x, cfg, self.eot_id).items()}
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with D.no_grad_sync(rig.model, info, skip=micro < accum - 1), rig.autocast:
                loss = rig.model(x, y, **extra).loss / accum
            rig.scaler.scale(loss).backward()
            self.loss_acc += loss.detach()
        if cfg.grad_clip:
            rig.scaler.unscale_(rig.optimizer)
            torch.nn.utils.clip_grad_norm_(rig.model.parameters(), cfg.grad_clip)
        rig.scaler.step(rig.optimizer)
        rig.scaler.update()
        rig.optimizer.zero_grad(set_to_none=True)
        p.step += 1
        p.tokens_seen += tokens_per_step
        self.window_tokens += tokens_per_step
        if p.step % cfg.log_interval == 0 or p.step == cfg.max_iters:
            self._log_train(lr)
        self.bar.update(1)

    def _log_train(self, lr: float) -> None:
        cfg, info, p = self.cfg, self.info, self.progress
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self._clock()
        steps_in_window = cfg.log_interval if p.step % cfg.log_interval == 0 else (p.step % cfg.log_interval or 1)
        D.all_reduce_mean(self.loss_acc, info)  # every rank's windows, not just rank 0's
        step_loss = self.loss_acc.item() / steps_in_window
        self.loss_acc.zero_()
        tps = self.window_tokens / max(self.window_time, 1e-9)
        mfu = self.flops_per_token * tps / (self.peak * info.world_size) if self.peak else None
        self.log.write({"event": "train", "step": p.step, "loss": step_loss, "lr": lr, "tokens_per_s": tps,
                        "mfu": mfu, "tokens_seen": p.tokens_seen, "train_time": p.train_time})
        postfix = {"loss": f"{step_loss:.3f}", "tok/s": f"{tps:,.0f}"}
        if mfu is not None:
            postfix["mfu"] = f"{mfu:.1%}"
        self.bar.set_postfix(postfix, refresh=False)
        self.window_tokens, self.window_time = 0, 0.0

    def finish(self) -> dict[str, Any]:
        """The summary: written to summary.json and the log's last record, and returned."""
        self.bar.close()
        cfg, info, p, last = self.cfg, self.info, self.progress, self.last_losses
        summary = {
            "steps": p.step, "tokens_seen": p.tokens_seen, "train_time_s": p.train_time,
            "tokens_per_s": p.tokens_seen / p.train_time if p.train_time else None,
            "final_train_loss": last["train"] if last else None,
            "final_val_loss": last["val"] if last else None,
            "best_val_loss": min((v for _, _, v in p.val_history), default=None),
            "best_val_step": min(p.val_history, key=lambda r: r[2])[0] if p.val_history else None,
            "overfitting": self.overfitting_since is not None,
            "overfitting_since_step": self.overfitting_since,
            # as all ranks agreed
            "stopped_by": "max_time" if self.stopped_by_time and p.step < cfg.max_iters else "max_iters",
            "params": self.rig.raw.num_params(), "vocab_size": self.mcfg.vocab_size, "world_size": info.world_size,
            "model": asdict(self.mcfg),
        }
        if info.is_main:
            atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2))
            self.log.write({"event": "summary", "step": p.step, **{k: v for k, v in summary.items() if k != "model"}})
            if not self.quiet:
                msg = (f"done: {p.step} steps, {p.tokens_seen:,} tokens in {p.train_time:.1f}s "
                       f"({summary['tokens_per_s'] or 0:,.0f} tok/s); val loss {summary['final_val_loss']:.4f}, "
                       f"best {summary['best_val_loss']:.4f} at step {summary['best_val_step']}")
                print(msg, file=sys.stderr)
                if summary["overfitting"]:
                    print(f"overfitting: val loss has risen since step {self.overfitting_since} while train loss "
                          "fell", file=sys.stderr)
        self.log.close()
        return summary
