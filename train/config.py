"""Configuration dataclasses and named presets.

``GPTConfig`` describes the architecture and is saved as ``config.json`` beside the
weights; export and serving rebuild the model from it and never guess. ``TrainConfig``
describes one training run; flags override a TOML/YAML file, which overrides a preset,
which overrides the defaults.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nextoken.errors import UserError

# GPTConfig fields whose value here is what GPT-2 (and so every GPT-2 loader) assumes; a recipe
# option that changes the architecture adds its field and GPT-2's value for it. (bias=False is
# GPT-2 with zero biases and zero_init only changes the starting weights: both representable.)
GPT2_ARCHITECTURE: dict[str, Any] = {
    "pos_emb": "learned",
    "qk_norm": False,
    "mlp_act": "gelu",
    "tie_embeddings": True,
    "logit_softcap": 0.0,
}
POS_EMBS = ("learned", "rope")
MLP_ACTS = ("gelu", "relu2")
OPTIMIZERS = ("adamw", "muon")


@dataclass
class GPTConfig:
    vocab_size: int = 256
    block_size: int = 256  # the longest context the position table covers
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True
    # Rounded up so the embedding/LM-head matmuls hit friendly sizes; ids >= vocab_size never occur.
    padded_vocab_size: int = 0
    # Recipe options (defaults: GPT-2). Each lives inside GPT.embed / attn.qkv / mlp / GPT.head,
    # the pieces both ONNX graphs are built from.
    pos_emb: str = "learned"  # learned: GPT-2's wpe table; rope: rotary q/k rotation at position_ids, no table
    rope_base: float = 10000.0  # rotary frequencies base ** (-2i / head_size); only read with pos_emb="rope"
    qk_norm: bool = False  # RMS-normalise each head's q and k (learned gain per channel) before rotary
    mlp_act: str = "gelu"  # gelu: tanh-approximate GELU (GPT-2's gelu_new); relu2: relu(x) ** 2
    tie_embeddings: bool = True  # False: the LM head is a matrix of its own, not the token embedding
    zero_init: bool = False  # attn.c_proj, mlp.c_proj (and an untied lm_head) start at zero
    logit_softcap: float = 0.0  # > 0: logits = cap * tanh(logits / cap); 0 = off

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.pos_emb not in POS_EMBS:
            raise ValueError(f"pos_emb must be one of {', '.join(POS_EMBS)}, got {self.pos_emb!r}")
        if self.pos_emb == "rope" and self.head_size % 2:
            raise ValueError(f"pos_emb='rope' rotates channel pairs: head size n_embd / n_head must be even, "
                             f"got {self.head_size}")
        if not self.rope_base > 1.0:
            raise ValueError(f"rope_base must be > 1, got {self.rope_base}")
        if self.mlp_act not in MLP_ACTS:
            raise ValueError(f"mlp_act must be one of {', '.join(MLP_ACTS)}, got {self.mlp_act!r}")
        if not self.logit_softcap >= 0.0:
            raise ValueError(f"logit_softcap must be >= 0 (0 = off), got {self.logit_softcap}")
        if self.padded_vocab_size < self.vocab_size:
            # Small (character) vocabularies stay exact: padding 67 to 128 would double the LM head.
            self.padded_vocab_size = self.vocab_size if self.vocab_size < 512 else math.ceil(self.vocab_size / 64) * 64

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    def non_gpt2_options(self) -> list[str]:
        """Options set away from GPT-2's architecture, by field name (empty = a plain GPT-2).

        Exporters to other ecosystems' GPT-2 loaders (Hugging Face, GGUF) refuse a model that
        has any, naming them, instead of writing weights a GPT-2 loader would misread.
        """
        return [name for name, gpt2_value in GPT2_ARCHITECTURE.items() if getattr(self, name) != gpt2_value]

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count computed from the shape; ``non_embedding`` leaves the position table out."""
        d, L = self.n_embd, self.n_layer
        per_block = 4 * d if self.bias else 2 * d  # two LayerNorms
        per_block += 3 * d * d + (3 * d if self.bias else 0) + d * d + (d if self.bias else 0)
        per_block += 8 * d * d + (5 * d if self.bias else 0)
        if self.qk_norm:
            per_block += 2 * self.head_size  # the q and k gains
        n = L * per_block + (2 * d if self.bias else d) + self.padded_vocab_size * d
        if not self.tie_embeddings:
            n += self.padded_vocab_size * d
        if self.pos_emb == "learned" and not non_embedding:
            n += self.block_size * d
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), as in the PaLM appendix B."""
        T = seq_len or self.block_size
        matmul_params = self.num_params()
        if not self.tie_embeddings:  # the input embedding is a lookup; the head (counted) is the matmul
            matmul_params -= self.padded_vocab_size * self.n_embd
        return 6 * matmul_params + 12 * self.n_layer * self.n_embd * T

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        """Rebuild from ``to_dict()``; a config written before an option existed gets GPT-2's value for it."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class TrainConfig:
    # data
    data: list[str] = field(default_factory=list)  # files, folders, globs; empty = built-in stdlib corpus
    text_field: str = "text"  # for .jsonl inputs
    max_corpus_chars: int = 0  # 0 = the whole corpus
    tokenizer: str = "bpe"  # char | word | bpe
    vocab_size: int = 4096  # target size for word and bpe
    val_fraction: float = 0.1
    # a GPT-2-layout Hugging Face folder to start from: it fixes the architecture and the tokenizer
    init_from: str = ""
    # model
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 256
    dropout: float = 0.0
    bias: bool = True
    # recipe options for the model (GPTConfig's fields of the same names; defaults: GPT-2)
    pos_emb: str = "learned"
    rope_base: float = 10000.0
    qk_norm: bool = False
    mlp_act: str = "gelu"
    tie_embeddings: bool = True
    zero_init: bool = False
    logit_softcap: float = 0.0
    doc_mask: bool = False  # attention and positions restart at every <|endoftext|> inside a window
    # optimisation
    optimizer: str = "adamw"  # adamw | muon (Muon for hidden matrices, AdamW for the rest)
    muon_lr: float = 0.02  # Muon's peak learning rate (the same warmup and decay shape as --learning-rate)
    muon_momentum: float = 0.95
    muon_ns_steps: int = 5  # Newton-Schulz iterations per update
    fused_adamw: bool = False  # AdamW's fused kernel on CPU too (CUDA always uses it; rounding differs ~1e-6)
    batch_size: int = 12
    tokens_per_step: int = 0  # 0 = batch_size * block_size * world_size (no accumulation)
    max_iters: int = 2000
    max_time: float = 0.0  # seconds of training before stopping early; 0 = no limit
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int = 0  # 0 = max_iters
    lr_schedule: str = "steps"  # steps: over lr_decay_iters; time: over max_time or max_iters, whichever ends first
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    # systems
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    compile: bool = False
    activation_checkpointing: bool = False
    strategy: str = "ddp"  # ddp | fsdp (only used under torchrun)
    threads: int = 0  # torch intra-op threads on CPU; 0 = leave PyTorch's default
    seed: int = 1337
    # bookkeeping
    out_dir: str = "runs/default"
    eval_interval: int = 250
    eval_iters: int = 20
    log_interval: int = 10
    sample_tokens: int = 120
    keep_last: int = 3
    overfit_patience: int = 3
    plot_log_scale: bool = False  # loss.png with a logarithmic loss axis
    resume: str = "never"  # never | auto | PATH to a checkpoint folder
    tensorboard: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def need(cond: bool, flag: str, msg: str) -> None:
            if not cond:
                raise UserError(msg, flag=flag)

        need(self.tokenizer in ("char", "word", "bpe"), "--tokenizer",
             f"must be one of char, word, bpe, got {self.tokenizer!r}")
        need(self.vocab_size >= 1, "--vocab-size", f"must be positive, got {self.vocab_size}")
        if self.tokenizer == "bpe":
            # 256 byte symbols and the end-of-text token must fit before any merge is learned.
            need(self.vocab_size >= 257, "--vocab-size",
                 f"byte-level BPE needs at least 257 entries (256 bytes + <|endoftext|>), got {self.vocab_size}")
        if self.tokenizer == "word":
            need(self.vocab_size >= 3, "--vocab-size",
                 f"a word vocabulary needs at least 3 entries, got {self.vocab_size}")
        need(0.0 < self.val_fraction < 0.5, "--val-fraction", f"must be in (0, 0.5), got {self.val_fraction}")
        for flag, v in (("--n-layer", self.n_layer), ("--n-head", self.n_head), ("--n-embd", self.n_embd),
                        ("--block-size", self.block_size), ("--batch-size", self.batch_size),
                        ("--max-iters", self.max_iters), ("--eval-iters", self.eval_iters),
                        ("--eval-interval", self.eval_interval), ("--log-interval", self.log_interval)):
            need(isinstance(v, int) and v >= 1, flag, f"must be a positive integer, got {v!r}")
        need(self.n_embd % self.n_head == 0, "--n-embd",
             f"must be divisible by --n-head ({self.n_head}), got {self.n_embd}")
        need(0.0 <= self.dropout < 1.0, "--dropout", f"must be in [0, 1), got {self.dropout}")
        need(self.learning_rate > 0, "--learning-rate", f"must be positive, got {self.learning_rate}")
        need(0 <= self.min_lr <= self.learning_rate, "--min-lr",
             f"must be in [0, --learning-rate={self.learning_rate}], got {self.min_lr}")
        need(self.warmup_iters >= 0, "--warmup-iters", f"must be >= 0, got {self.warmup_iters}")
        need(self.lr_schedule in ("steps", "time"), "--lr-schedule",
             f"must be steps or time, got {self.lr_schedule!r}")
        if self.lr_schedule == "time":
            need(self.lr_decay_iters == 0, "--lr-decay-iters",
                 "does not apply with --lr-schedule time (the decay ends at --max-time)")
        need(self.tokens_per_step >= 0, "--tokens-per-step", f"must be >= 0, got {self.tokens_per_step}")
        need(self.grad_clip >= 0, "--grad-clip", f"must be >= 0, got {self.grad_clip}")
        need(self.dtype in ("auto", "float32", "bfloat16", "float16"), "--dtype",
             f"must be one of auto, float32, bfloat16, float16, got {self.dtype!r}")
        need(self.strategy in ("ddp", "fsdp"), "--strategy", f"must be ddp or fsdp, got {self.strategy!r}")
        need(self.keep_last >= 1, "--keep-last", f"must be >= 1, got {self.keep_last}")
        need(self.optimizer in OPTIMIZERS, "--optimizer", f"must be one of {', '.join(OPTIMIZERS)}, "
             f"got {self.optimizer!r}")
        need(self.muon_lr > 0, "--muon-lr", f"must be positive, got {self.muon_lr}")
        need(0.0 <= self.muon_momentum < 1.0, "--muon-momentum", f"must be in [0, 1), got {self.muon_momentum}")
        need(isinstance(self.muon_ns_steps, int) and 1 <= self.muon_ns_steps <= 20, "--muon-ns-steps",
             f"must be an integer in [1, 20], got {self.muon_ns_steps!r}")
        if self.optimizer != "muon":
            # Muon's settings would be accepted and do nothing: refuse them by name instead.
            for name in ("muon_lr", "muon_momentum", "muon_ns_steps"):
                default = TrainConfig.__dataclass_fields__[name].default
                need(getattr(self, name) == default, "--" + name.replace("_", "-"),
                     f"only applies with --optimizer muon (got --optimizer {self.optimizer})")
        need(self.pos_emb in POS_EMBS, "--pos-emb", f"must be one of {', '.join(POS_EMBS)}, got {self.pos_emb!r}")
        if self.pos_emb == "rope":
            need((self.n_embd // self.n_head) % 2 == 0, "--pos-emb",
                 f"rope rotates channel pairs: the head size --n-embd / --n-head must be even, "
                 f"got {self.n_embd // self.n_head}")
        else:
            need(self.rope_base == 10000.0, "--rope-base", "only applies with --pos-emb rope")
        need(self.rope_base > 1.0, "--rope-base", f"must be > 1, got {self.rope_base}")
        need(self.mlp_act in MLP_ACTS, "--mlp-act", f"must be one of {', '.join(MLP_ACTS)}, got {self.mlp_act!r}")
        need(self.logit_softcap >= 0, "--logit-softcap", f"must be >= 0 (0 = off), got {self.logit_softcap}")
        need(self.max_time >= 0, "--max-time", f"must be >= 0, got {self.max_time}")

    def model_config(self, vocab_size: int) -> GPTConfig:
        return GPTConfig(vocab_size=vocab_size, block_size=self.block_size, n_layer=self.n_layer,
                         n_head=self.n_head, n_embd=self.n_embd, dropout=self.dropout, bias=self.bias,
                         pos_emb=self.pos_emb, rope_base=self.rope_base, qk_norm=self.qk_norm, mlp_act=self.mlp_act,
                         tie_embeddings=self.tie_embeddings, zero_init=self.zero_init,
                         logit_softcap=self.logit_softcap)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}


# The training recipe the two-minute presets use (benchmarks/bench_recipe.py; figures in
# benchmarks/RESULTS.md). At 1M tinyshakespeare tokens each change alone moved val loss from the
# GPT-2-style 1.819 by: Muon -0.163, rotary -0.024, ReLU^2 -0.010, zero-init -0.005, soft-cap
# +0.003, QK-norm +0.025, untied head +0.022; all together -0.187 (1.633), better than the three
# that helped alone together (1.646): QK-norm and soft-capping keep Muon's larger steps in check.
# Document masking is left off: the char corpus has no boundaries, and it was not measured on BPE.
RECIPE: dict[str, Any] = dict(optimizer="muon", pos_emb="rope", qk_norm=True, mlp_act="relu2", tie_embeddings=False,
                              zero_init=True, logit_softcap=15.0)

# Named presets: partial TrainConfig overrides.
PRESETS: dict[str, dict[str, Any]] = {
    # nanoGPT's README CPU recipe for shakespeare_char, same shape and schedule.
    "nanogpt-cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, max_iters=2000,
                        lr_decay_iters=2000, dropout=0.0, learning_rate=1e-3, min_lr=1e-4, warmup_iters=100,
                        beta2=0.99, weight_decay=0.1, eval_interval=250, eval_iters=20, tokenizer="char"),
    # The quickstart: a small BPE model on the built-in corpus, a couple of minutes on a laptop CPU,
    # with the training recipe (RECIPE below) and a decay that follows the clock.
    "quickstart": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, batch_size=16, max_iters=1200,
                       learning_rate=2e-3, min_lr=2e-4, warmup_iters=50, tokenizer="bpe", vocab_size=2048,
                       eval_interval=300, eval_iters=10, max_corpus_chars=6_000_000, max_time=150.0,
                       lr_schedule="time", **RECIPE),
    # Tuned for the lowest val loss in about two minutes on a 2-core CPU (tinyshakespeare, characters;
    # benchmarks/bench_preset.py, figures in benchmarks/RESULTS.md). nanoGPT's shape with a 5x learning
    # rate, a 50-step warmup and a cosine decay sized to the steps that fit: ~3800 steps at ~28 ms
    # (2 threads, quiet machine, ~27k tok/s) is ~110 s. Measured on 8 candidates: the learning rate
    # was the big lever (1e-3 -> 4e-3..6e-3: val 1.89 -> 1.71 in the same time); at equal time this shape
    # (768 tokens/step) beat a 96-wide model at 1536 tokens/step and a 128-context one at 2048; a
    # 128 context did not pay for its cost. max_time stops a run on a busy machine (before the decay ends).
    "shakespeare-char": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, max_iters=3800,
                             learning_rate=5e-3, min_lr=5e-4, warmup_iters=50, beta2=0.99,
                             weight_decay=0.1, dropout=0.0, tokenizer="char", eval_interval=950, eval_iters=20,
                             max_time=120.0, lr_schedule="time", **RECIPE),
    # GPT-2 small (124M) shape, for GPU runs.
    "gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=16, tokens_per_step=524288,
                      learning_rate=6e-4, min_lr=6e-5, warmup_iters=700, max_iters=19073, weight_decay=0.1,
                      beta2=0.95, tokenizer="bpe", vocab_size=50257, dropout=0.0, eval_interval=250),
}


def load_config_file(path: str) -> dict[str, Any]:
    """Read a TOML or YAML file of TrainConfig fields (dashes or underscores)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {path!r} does not exist", flag="--config")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix == ".toml":
            import tomllib

            raw = tomllib.loads(text)
        elif p.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text) or {}
        elif p.suffix == ".json":
            raw = json.loads(text)
        else:
            raise UserError(f"{path!r}: use a .toml, .yaml or .json file", flag="--config")
    except UserError:
        raise
    except Exception as e:  # the parsers' own errors name the line
        raise UserError(f"{path!r} could not be parsed: {e}", flag="--config") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path!r} must hold a table of settings", flag="--config")
    out = {}
    names = TrainConfig.field_names()
    for key, value in raw.items():
        k = key.replace("-", "_")
        if k not in names:
            raise UserError(f"{path!r}: unknown setting {key!r}", flag="--config")
        out[k] = value
    return out


def resolve_train_config(preset: str | None, config_file: str | None, overrides: dict[str, Any]) -> TrainConfig:
    """Defaults < preset < config file < flags; a resume continues the run in ``--out-dir`` instead.

    With ``--resume`` (auto, or a checkpoint of that folder) and a run already in the folder, its
    saved settings are the run's: see ``resumed_settings``.
    """
    merged: dict[str, Any] = {}
    if preset:
        if preset not in PRESETS:
            raise UserError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}", flag="--preset")
        merged.update(PRESETS[preset])
    from_file = load_config_file(config_file) if config_file else {}
    merged.update(from_file)
    explicit = {k: v for k, v in overrides.items() if v is not None}
    merged.update(explicit)
    saved = saved_run_settings(merged)
    if saved is not None:
        return TrainConfig(**resumed_settings(saved, merged, preset=preset, explicit=set(from_file) | set(explicit)))
    if merged.get("init_from"):
        merged.update(init_from_settings(merged["init_from"], {**from_file, **explicit}))
    return TrainConfig(**merged)


# What a resume may change: the budget, how often it evaluates, logs, samples and keeps checkpoints,
# and where and how it computes. Everything else (data, tokenizer, architecture, optimisation) is the
# run's own: a different value would train another run under this one's name.
RESUMABLE = ("max_iters", "max_time", "eval_interval", "eval_iters", "log_interval", "sample_tokens", "keep_last",
             "overfit_patience", "plot_log_scale", "tensorboard", "progress", "device", "dtype", "compile",
             "activation_checkpointing", "strategy", "threads", "resume", "out_dir")


def _default(name: str) -> Any:
    f = TrainConfig.__dataclass_fields__[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def resumes_own_run(resume: str, run_dir: Path) -> bool:
    """``--resume`` continues the run saved in ``run_dir``: auto, or a checkpoint of that folder."""
    if resume == "never" or not (run_dir / "config.json").is_file():
        return False
    return resume == "auto" or (run_dir / "checkpoints").resolve() in Path(resume).resolve().parents


def saved_run_settings(requested: dict[str, Any]) -> dict[str, Any] | None:
    """The TrainConfig fields saved in ``out_dir/config.json`` when this is a resume of that run, else None.

    A resume of the folder's run: ``--resume auto``, or ``--resume`` naming a checkpoint inside
    ``out_dir/checkpoints``. A checkpoint from elsewhere starts a new run from its weights (what
    ``retrain`` does with a published version), so the requested settings stand.
    """
    run_dir = Path(requested.get("out_dir", TrainConfig.out_dir))
    if not resumes_own_run(requested.get("resume", "never"), run_dir):
        return None
    try:
        saved = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))["train"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{run_dir / 'config.json'} is not a run config ({e}); a resume continues the run saved "
                        "there", flag="--resume") from None
    names = TrainConfig.field_names()
    return {k: v for k, v in saved.items() if k in names}


def resumed_settings(saved: dict[str, Any], requested: dict[str, Any], *, preset: str | None,
                     explicit: set[str]) -> dict[str, Any]:
    """The saved run's settings with the requested changes that a resume may make.

    A setting asked for (by a flag, the config file or the preset) with another value than the run
    was trained with is refused by name, unless it is in ``RESUMABLE``; asking for the same value
    again is fine, so a torchrun restart may repeat its whole command line.
    """
    out = dict(saved, out_dir=requested.get("out_dir", TrainConfig.out_dir))  # where it is now, if it moved
    for name, value in requested.items():
        if name in RESUMABLE:
            out[name] = value
            continue
        was = saved[name] if name in saved else _default(name)  # a field newer than the run: its default
        if value == was:
            continue
        flag = "--" + name.replace("_", "-")
        source = f"--preset {preset} sets it to" if name not in explicit and preset else "asked for"
        raise UserError(f"the run in {requested.get('out_dir', TrainConfig.out_dir)} was trained with {name}={was!r} "
                        f"({source} {value!r}); a resume continues that run as it was, changing only "
                        f"{', '.join('--' + n.replace('_', '-') for n in RESUMABLE[:-2])}. To train otherwise, "
                        "start a new --out-dir (--init-from takes a finished run's export)", flag=flag)
    return out


# What an --init-from folder fixes: the architecture (GPTConfig's fields), the tokenizer, and the
# starting weights (so zero_init, an initialisation choice, has nothing to act on).
INIT_FROM_FIXED = ("tokenizer", "vocab_size", "n_layer", "n_head", "n_embd", "bias", "rope_base", "zero_init",
                   *GPT2_ARCHITECTURE)


def init_from_settings(folder: str, explicit: dict[str, Any]) -> dict[str, Any]:
    """The TrainConfig fields a GPT-2-layout folder sets, so the run's config.json says what it trains.

    Setting one of them too (a flag or the config file) is refused by name: the weights cannot
    take another shape. A preset's architecture gives way to the folder's. The training window
    (``block_size``) defaults to the folder's context and may be shorter.
    """
    from nextoken.train.hf_import import read_hf_config

    for name in INIT_FROM_FIXED:
        if name in explicit:
            raise UserError(f"--init-from {folder} fixes the architecture and the tokenizer; drop --"
                            f"{name.replace('_', '-')}", flag="--" + name.replace("_", "-"))
    g = read_hf_config(folder)
    fixed = {name: getattr(g, name) for name in INIT_FROM_FIXED if name != "tokenizer"}
    fixed["tokenizer"] = "bpe"
    if "block_size" not in explicit:
        fixed["block_size"] = g.block_size
    elif explicit["block_size"] > g.block_size:
        raise UserError(f"{explicit['block_size']} exceeds the context ({g.block_size}) of {folder}",
                        flag="--block-size")
    return fixed
