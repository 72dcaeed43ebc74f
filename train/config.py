"""The configuration dataclasses: ``GPTConfig`` (the architecture) and ``TrainConfig`` (one training run).

``GPTConfig`` is saved as ``config.json`` beside the weights; export and serving rebuild the
model from it and never guess. ``TrainConfig`` holds every setting of a run with its default
and checks them (naming the flag). How a run's settings are chosen (presets, a config file,
flags, a resume, an ``--init-from`` folder) is ``settings``' business, not this module's.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
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
