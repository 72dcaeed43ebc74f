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
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from nextoken.errors import UserError
from nextoken.fileio import atomic_write_text
from nextoken.train import distributed as D
from nextoken.train.checkpoint import (
    find_resume_checkpoint,
    list_checkpoints,
    load_train_state,
    load_weights,
    prune_checkpoints,
    save_checkpoint,
    verify_checkpoint,
)
from nextoken.train.config import GPTConfig, TrainConfig
from nextoken.train.data import (
    TokenData,
    WindowSampler,
    document_layout,
    eval_starts,
    tokenize_corpus,
    windows,
)
from nextoken.train.model import GPT
from nextoken.train.optim import build_optimizer
from nextoken.train.run import resolve_device
from nextoken.train.settings import resumes_own_run
from nextoken.train.sources import resolve_sources
from nextoken.train.tokenizer import EOT, load_tokenizer, special_token_ids, tokenizer_kind, train_tokenizer

# Dense bf16 peak FLOP/s per device, for MFU. Unknown devices (and CPUs) report no MFU.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12,
              "4090": 165e12, "3090": 71e12, "V100": 125e12, "T4": 65e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def lr_at(it: int, cfg: TrainConfig, time_fraction: float | None = None) -> float:
    """Linear warmup to ``learning_rate``, cosine decay to ``min_lr`` at ``lr_decay_iters``, then flat.

    With ``lr_schedule="time"`` the decay follows whichever budget is further spent: the time
    (``time_fraction``: training seconds so far over ``max_time``) or the steps (over
    ``max_iters``). A run ends fully decayed whichever stops it, whatever the machine's speed
    (at the price of a resume that is exact only up to the clock: the rate then depends on timing).
    """
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if cfg.lr_schedule == "time":
        if time_fraction is None:
            raise ValueError("lr_schedule='time' needs the fraction of max_time used")
        steps = (it - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters)
        ratio = min(1.0, max(0.0, time_fraction, steps))
    else:
        decay_iters = cfg.lr_decay_iters or cfg.max_iters
        if it >= decay_iters:
            return cfg.min_lr
        ratio = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
    return cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)


def set_learning_rates(optimizer: torch.optim.Optimizer, it: int, cfg: TrainConfig,
                       time_fraction: float | None = None) -> float:
    """Every group at step ``it`` of the schedule, scaled from its own peak; returns AdamW's lr.

    AdamW groups get ``lr_at`` itself; Muon groups the same curve from ``muon_lr`` (warmup,
    cosine decay, and a floor at the same fraction ``min_lr / learning_rate``).
    """
    lr = lr_at(it, cfg, time_fraction)
    for group in optimizer.param_groups:
        group["lr"] = lr * (cfg.muon_lr / cfg.learning_rate) if group.get("muon", False) else lr
    return lr


def model_inputs(x: torch.Tensor, cfg: TrainConfig, eot_id: int | None) -> dict[str, torch.Tensor]:
    """Keyword inputs besides the token ids: document ids and positions when ``doc_mask`` is on."""
    if not cfg.doc_mask:
        return {}
    assert eot_id is not None  # the loop refuses doc_mask without an end-of-text token
    document_ids, position_ids = document_layout(x, eot_id)  # each (B, T)
    return {"document_ids": document_ids, "position_ids": position_ids}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name == "float16" and device.type != "cuda":
        raise UserError("float16 training needs CUDA (it uses a gradient scaler); use bfloat16 on CPU",
                        flag="--dtype")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


class MetricsLog:
    """Append-only JSONL of every metric, mirrored to TensorBoard when available."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, resume_step: int | None) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.records: list[dict[str, Any]] = []
        self.tb = None
        if not enabled:
            return
        if resume_step is not None and self.path.is_file():
            # Drop what was logged after the checkpoint we resume from: it is about to be redone.
            kept = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            # A "train" record at step k reports the k-th update, which the checkpoint at k includes.
            self.records = [r for r in kept if r.get("step", 0) < resume_step
                            or (r.get("event") == "train" and r.get("step") == resume_step)]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))
        elif self.path.exists():
            self.path.unlink()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step)
            except ImportError:
                self.tb = None
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.records.append(record)
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        if self.tb is not None:
            step = record["step"]
            for k, v in record.items():
                if k not in ("step", "event") and isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(f"{record['event']}/{k}", v, step)

    def close(self) -> None:
        if self.enabled:
            self._fh.close()
            if self.tb is not None:
                self.tb.close()


def _prepare_tokenizer_and_data(cfg: TrainConfig, run_dir: Path, info: D.DistInfo, resuming: bool,
                                say: Callable[[str], None], given: Any = None,
                                own_run: bool = False, quiet: bool = False) -> tuple[Any, TokenData]:
    """The run's tokenizer (kept when resuming, ``given`` by an --init-from folder, else trained) and data.

    ``own_run``: continuing the run in ``run_dir``, whose tokenizer and tokenized corpus are read
    as they are (the sources are not read again, nothing is rewritten).
    """
    tok_path = run_dir / "tokenizer.json"
    if own_run and tok_path.is_file() and (run_dir / "data" / "manifest.json").is_file():
        D.barrier(info)
        data = TokenData(run_dir / "data")
        data.check_block_size(cfg.block_size)
        return load_tokenizer(tok_path), data
    files = resolve_sources(cfg.data)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resuming and tok_path.is_file():
            tok = load_tokenizer(tok_path)
        elif given is not None:
            tok = given
            atomic_write_text(tok_path, tok.to_str(pretty=True))
        else:
            source = "the built-in corpus (Python standard library)" if not cfg.data else f"{len(files)} file(s)"
            say(f"training a {cfg.tokenizer} tokenizer on {source}")
            from nextoken.train.data import iter_documents

            tok = train_tokenizer(cfg.tokenizer, iter_documents(files, cfg.text_field, cfg.max_corpus_chars),
                                  cfg.vocab_size)
            atomic_write_text(tok_path, tok.to_str(pretty=True))
        manifest = tokenize_corpus(files, tok, run_dir / "data", text_field=cfg.text_field,
                                   max_chars=cfg.max_corpus_chars, val_fraction=cfg.val_fraction,
                                   progress=cfg.progress and not quiet)
        say(f"corpus: {manifest.num_documents} documents, {manifest.num_chars:,} characters, "
            f"{manifest.num_tokens:,} tokens (vocab {tok.get_vocab_size()}); "
            f"{manifest.split:,} train / {manifest.num_tokens - manifest.split:,} val")
    D.barrier(info)
    tok = load_tokenizer(tok_path)
    data = TokenData(run_dir / "data")
    data.check_block_size(cfg.block_size)
    return tok, data


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: TokenData, cfg: TrainConfig, device: torch.device,
             autocast: Any, info: D.DistInfo, eot_id: int | None = None) -> dict[str, float]:
    """Mean loss over fixed windows of each split, shared out between ranks (masked as in training)."""
    model.eval()
    out = {}
    per_rank = math.ceil(cfg.eval_iters * cfg.batch_size / info.world_size)
    for name, tokens in (("train", data.train), ("val", data.val)):
        starts = eval_starts(len(tokens), cfg.block_size, per_rank * info.world_size)[info.rank::info.world_size]
        total = torch.zeros(2, device=device)  # (sum of losses, count)
        for i in range(0, len(starts), cfg.batch_size):
            x, y = windows(tokens, starts[i: i + cfg.batch_size], cfg.block_size)
            extra = {k: v.to(device) for k, v in model_inputs(x, cfg, eot_id).items()}
            with autocast:
                loss = model(x.to(device), y.to(device), **extra).loss
            total += torch.stack([loss.float() * len(x), torch.tensor(float(len(x)), device=device)])
        D.all_reduce_mean(total, info)
        out[name] = (total[0] / total[1]).item()
    model.train()
    return out


def _sample_texts(model: GPT, tok: Any, cfg: TrainConfig, device: torch.device, step: int, n: int = 2) -> list[str]:
    eot = tok.token_to_id(EOT)
    gen = torch.Generator(device=device).manual_seed(cfg.seed + step)  # never touches the training RNG
    start = torch.full((n, 1), eot, dtype=torch.long, device=device)
    out = model.generate(start, cfg.sample_tokens, temperature=0.8, top_k=50, generator=gen)
    model.train()
    return [tok.decode(row[1:].tolist()) for row in out]


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
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype = resolve_dtype(cfg.dtype, device)  # before any work, so a bad --dtype fails at once
    run_dir = Path(cfg.out_dir)
    ckpt_root = run_dir / "checkpoints"

    # --- what to resume from -----------------------------------------------------------------
    resume_from = None
    if cfg.resume == "auto":
        resume_from = find_resume_checkpoint(ckpt_root, warn=say)
    elif cfg.resume != "never":
        resume_from_path = Path(cfg.resume)
        verify_checkpoint(resume_from_path)
        resume_from = resume_from_path
    elif list_checkpoints(ckpt_root):
        raise UserError(f"{run_dir} already holds checkpoints; pass --resume auto to continue it, or choose a new "
                        "--out-dir", flag="--out-dir")
    resume_path = resume_from.path if hasattr(resume_from, "path") else resume_from
    # Continuing the run in this folder (cfg holds its saved settings: train.settings.resumed_settings):
    # its tokenizer, tokenized corpus and architecture as saved; config.json is rewritten only after
    # the checkpoint has loaded, and only if a setting a resume may change did change.
    saved_config = json.loads((run_dir / "config.json").read_text()) if resumes_own_run(cfg.resume, run_dir) else None

    start = None
    if cfg.init_from and saved_config is None:  # the folder's architecture, tokenizer and weights
        from nextoken.train.hf_import import init_from_hf

        start = init_from_hf(cfg.init_from, dropout=cfg.dropout, block_size=cfg.block_size)
        say(f"starting from {cfg.init_from}: {start.config.n_layer} layers, {start.config.n_embd} wide, "
            f"context {start.config.block_size}")
    tok, data = _prepare_tokenizer_and_data(cfg, run_dir, info, resume_path is not None, say,
                                            given=start.tokenizer if start else None,
                                            own_run=saved_config is not None, quiet=quiet)
    eot_id = tok.token_to_id(EOT)
    if cfg.doc_mask and eot_id is None:
        raise UserError(f"the tokenizer has no {EOT} token to find document boundaries by", flag="--doc-mask")
    # An --init-from model keeps its own vocabulary size (a padded table stays padded) and context.
    if saved_config is not None:
        mcfg = GPTConfig.from_dict(saved_config["model"])
    else:
        mcfg = start.config if start else cfg.model_config(tok.get_vocab_size())
    run_config = {"model": mcfg.to_dict(), "train": cfg.to_dict(),
                  "tokenizer": {"kind": tokenizer_kind(tok), "vocab_size": tok.get_vocab_size(),
                                **special_token_ids(tok)}}
    if info.is_main and saved_config is None:
        atomic_write_text(run_dir / "config.json", json.dumps(run_config, indent=2))

    # --- model, optimizer, state -------------------------------------------------------------
    # The same initial weights on every rank: DDP would broadcast rank 0's anyway, but FSDP2
    # shards each rank's own copy, so per-rank seeds here would stitch two inits together.
    torch.manual_seed(cfg.seed)
    raw = GPT(mcfg)
    if info.rank:  # dropout differs between ranks (rank 0, and one process, keep the seed's stream)
        torch.manual_seed(cfg.seed + info.rank)
    raw.activation_checkpointing = cfg.activation_checkpointing
    state: dict[str, Any] = {}
    if resume_path is not None:
        load_weights(resume_path, raw, verify=False)
        state = load_train_state(resume_path)
    elif start is not None:
        raw.load_state_dict(start.state_dict)
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

    micro_tokens = cfg.batch_size * cfg.block_size * info.world_size
    accum = max(1, round(cfg.tokens_per_step / micro_tokens)) if cfg.tokens_per_step else 1
    if cfg.tokens_per_step and cfg.tokens_per_step % micro_tokens:
        say(f"note: --tokens-per-step {cfg.tokens_per_step} is not a multiple of batch x block x world "
            f"({micro_tokens}); using {accum * micro_tokens} ({accum} micro-steps)")
    tokens_per_step = accum * micro_tokens

    sampler = WindowSampler(data.train, cfg.block_size, cfg.batch_size, seed=cfg.seed + 1000 * info.rank)
    start_iter, tokens_seen, train_time = 0, 0, 0.0
    val_history: list[tuple[int, float, float]] = []  # (step, train_loss, val_loss) at each evaluation
    if state:
        start_iter = int(state["step"])
        tokens_seen = int(state["tokens_seen"])
        train_time = float(state["train_time"])
        val_history = [tuple(v) for v in state.get("val_history", [])]
        samplers = state["sampler"]
        if len(samplers) == info.world_size:
            torch.set_rng_state(state["rng"][info.rank])
            sampler.load_state_dict(samplers[info.rank])
        else:  # a different world size: fresh, distinct streams that depend on where we resume
            sampler.generator.manual_seed(cfg.seed + 1000 * info.rank + start_iter)
            torch.manual_seed(cfg.seed + info.rank + start_iter)
        if "scaler" in state and scaler.is_enabled():
            scaler.load_state_dict(state["scaler"])
        say(f"resuming from {resume_path} at step {start_iter}")
    if info.is_main and saved_config is not None:
        # The checkpoint has loaded: now record what changed (a longer budget, another cadence). Where
        # the run lives and how this invocation resumed it describe the command, not the run.
        kept = {k: saved_config["train"][k] for k in ("out_dir", "resume") if k in saved_config["train"]}
        if dict(run_config["train"], **kept) != saved_config["train"]:
            saved_config["train"] = dict(run_config["train"], **kept)
            atomic_write_text(run_dir / "config.json", json.dumps(saved_config, indent=2))

    n_params = raw.num_params()
    say(f"model: {n_params / 1e6:.2f}M parameters ({mcfg.n_layer} layers, {mcfg.n_head} heads, {mcfg.n_embd} wide, "
        f"context {mcfg.block_size}); {tokens_per_step:,} tokens/step ({accum} micro-step(s) x {info.world_size} "
        f"rank(s)); device {device}, {str(dtype).removeprefix('torch.')}")

    log = MetricsLog(run_dir, info.is_main, cfg.tensorboard, start_iter if state else None)
    flops_per_token = mcfg.flops_per_token(cfg.block_size)
    peak = peak_flops(device)
    bar = tqdm(total=cfg.max_iters, initial=start_iter, desc="training", unit="step", dynamic_ncols=True,
               disable=not (info.is_main and cfg.progress and not quiet), file=sys.stderr)

    def checkpoint(step: int, losses: dict[str, float] | None) -> None:
        model_state = D.full_model_state(model, info, cfg.strategy)  # collective under FSDP
        optim_state = D.full_optimizer_state(model, optimizer, info, cfg.strategy)
        rngs = D.all_gather_object(torch.get_rng_state(), info)
        samplers = D.all_gather_object(sampler.state_dict(), info)
        if not info.is_main:
            return
        train_state = {"step": step, "optimizer": optim_state, "rng": rngs, "sampler": samplers,
                       "tokens_seen": tokens_seen, "train_time": train_time,
                       "val_history": [list(v) for v in val_history]}
        if scaler.is_enabled():
            train_state["scaler"] = scaler.state_dict()
        meta = {"tokens_seen": tokens_seen, "train_time": train_time, "world_size": info.world_size,
                "train_loss": losses["train"] if losses else None, "val_loss": losses["val"] if losses else None}
        save_checkpoint(ckpt_root, step, model_state, train_state, meta, tied=raw.tied)
        prune_checkpoints(ckpt_root, cfg.keep_last)

    it = start_iter
    window_tokens, window_time = 0, 0.0
    loss_acc = torch.zeros((), device=device)
    overfitting_since: int | None = None
    last_losses: dict[str, float] | None = None
    t_step = time.perf_counter()
    while True:
        out_of_time = bool(cfg.max_time) and train_time >= cfg.max_time
        if cfg.max_time and info.enabled:
            # Clocks differ between ranks; a rank that stopped alone would leave the others
            # waiting in the next all-reduce, so all stop when any is out of time.
            out_of_time = D.any_rank(out_of_time, info)
        final = it >= cfg.max_iters or out_of_time
        if it % cfg.eval_interval == 0 or final:
            now = time.perf_counter()  # steps since the last log count as training time; evaluation does not
            window_time += now - t_step
            train_time += now - t_step
            losses = evaluate(model, data, cfg, device, autocast, info, eot_id)
            last_losses = losses
            if not val_history or val_history[-1][0] != it:
                val_history.append((it, losses["train"], losses["val"]))
            rec = {"event": "eval", "step": it, "train_loss": losses["train"], "val_loss": losses["val"],
                   "train_ppl": math.exp(min(losses["train"], 50)), "val_ppl": math.exp(min(losses["val"], 50)),
                   "tokens_seen": tokens_seen, "train_time": train_time}
            log.write(rec)
            overfitting_since = overfit_start(val_history, cfg.overfit_patience)
            samples = []
            if cfg.sample_tokens and (info.is_main or cfg.strategy == "fsdp"):
                samples = _sample_texts(D.unwrap(model), tok, cfg, device, it)
            if info.is_main:
                bar.write(f"step {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f} "
                          f"(ppl {rec['val_ppl']:.2f})") if not quiet else None
                for s in samples:
                    log.write({"event": "sample", "step": it, "text": s})
                if overfitting_since is not None and not quiet:
                    bar.write(f"warning: val loss has risen for {cfg.overfit_patience} evaluations since step "
                              f"{overfitting_since} while train loss fell: the model is overfitting")
                from nextoken.train.plots import plot_loss

                plot_loss(log.records, run_dir / "loss.png", mcfg.vocab_size, log_scale=cfg.plot_log_scale)
            if not (state and it == start_iter):  # the checkpoint we resumed from is this one
                checkpoint(it, losses)
            t_step = time.perf_counter()
        if final:
            break

        time_fraction = None
        if cfg.lr_schedule == "time":
            elapsed = train_time + (time.perf_counter() - t_step)  # training seconds, evaluation excluded
            # every rank must step with the same learning rate: take the clock furthest along
            time_fraction = D.max_over_ranks(elapsed, info) / cfg.max_time if cfg.max_time else 0.0
        lr = set_learning_rates(optimizer, it, cfg, time_fraction)
        for micro in range(accum):
            x, y = sampler.next_batch()
            extra = {k: v.to(device, non_blocking=True) for k, v in model_inputs(x, cfg, eot_id).items()}
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with D.no_grad_sync(model, info, skip=micro < accum - 1), autocast:
                loss = model(x, y, **extra).loss / accum
            scaler.scale(loss).backward()
            loss_acc += loss.detach()
        if cfg.grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        it += 1
        tokens_seen += tokens_per_step
        window_tokens += tokens_per_step
        if it % cfg.log_interval == 0 or it == cfg.max_iters:
            if device.type == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            window_time += now - t_step
            train_time += now - t_step
            t_step = now
            steps_in_window = cfg.log_interval if it % cfg.log_interval == 0 else (it % cfg.log_interval or 1)
            D.all_reduce_mean(loss_acc, info)  # every rank's windows, not just rank 0's
            step_loss = loss_acc.item() / steps_in_window
            loss_acc.zero_()
            tps = window_tokens / max(window_time, 1e-9)
            mfu = flops_per_token * tps / (peak * info.world_size) if peak else None
            log.write({"event": "train", "step": it, "loss": step_loss, "lr": lr, "tokens_per_s": tps,
                       "mfu": mfu, "tokens_seen": tokens_seen, "train_time": train_time})
            postfix = {"loss": f"{step_loss:.3f}", "tok/s": f"{tps:,.0f}"}
            if mfu is not None:
                postfix["mfu"] = f"{mfu:.1%}"
            bar.set_postfix(postfix, refresh=False)
            window_tokens, window_time = 0, 0.0
        bar.update(1)
    bar.close()

    summary = {
        "steps": it, "tokens_seen": tokens_seen, "train_time_s": train_time,
        "tokens_per_s": tokens_seen / train_time if train_time else None,
        "final_train_loss": last_losses["train"] if last_losses else None,
        "final_val_loss": last_losses["val"] if last_losses else None,
        "best_val_loss": min((v for _, _, v in val_history), default=None),
        "best_val_step": min(val_history, key=lambda r: r[2])[0] if val_history else None,
        "overfitting": overfitting_since is not None,
        "overfitting_since_step": overfitting_since,
        "stopped_by": "max_time" if out_of_time and it < cfg.max_iters else "max_iters",  # as all ranks agreed
        "params": n_params, "vocab_size": mcfg.vocab_size, "world_size": info.world_size,
        "model": asdict(mcfg),
    }
    if info.is_main:
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
        log.write({"event": "summary", "step": it, **{k: v for k, v in summary.items() if k != "model"}})
        if not quiet:
            msg = (f"done: {it} steps, {tokens_seen:,} tokens in {train_time:.1f}s "
                   f"({summary['tokens_per_s'] or 0:,.0f} tok/s); val loss {summary['final_val_loss']:.4f}, "
                   f"best {summary['best_val_loss']:.4f} at step {summary['best_val_step']}")
            print(msg, file=sys.stderr)
            if summary["overfitting"]:
                print(f"overfitting: val loss has risen since step {overfitting_since} while train loss fell",
                      file=sys.stderr)
    log.close()
    return summary


def overfit_start(history: list[tuple[int, float, float]], patience: int) -> int | None:
    """The step where val loss started rising for ``patience`` evaluations in a row while train loss fell."""
    if len(history) <= patience:
        return None
    recent = history[-(patience + 1):]
    val_up = all(b[2] > a[2] for a, b in zip(recent, recent[1:], strict=False))
    train_down = all(b[1] < a[1] for a, b in zip(recent, recent[1:], strict=False))
    return recent[0][0] if val_up and train_down else None
