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
# The same for the Llama family's loaders (Llama, Qwen2, Mistral): an untied head, grouped-query
# attention, any head_dim, rope_theta and llama3 / linear rope scaling are theirs too.
LLAMA_ARCHITECTURE: dict[str, Any] = {"qk_norm": False, "logit_softcap": 0.0}
# What each family fixes of the GPT-2 family's options: the llama family is always rotary, SwiGLU
# and bias-free (Qwen2's q/k/v bias is qkv_bias).
FAMILY_FIXED: dict[str, dict[str, Any]] = {"gpt2": {}, "llama": {"pos_emb": "rope", "mlp_act": "swiglu", "bias": False}}
ARCHS = tuple(FAMILY_FIXED)
POS_EMBS = ("learned", "rope")
MLP_ACTS = ("gelu", "relu2", "swiglu")
ROPE_SCALINGS = {"linear": ("factor",),
                 "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
OPTIMIZERS = ("adamw", "muon")


def swiglu_width(n_embd: int) -> int:
    """The llama family's default MLP width: 8/3 of the model's, rounded up to a multiple of 64."""
    return 64 * math.ceil(8 * n_embd / 3 / 64)


def check_rope_scaling(scaling: dict[str, Any] | None) -> None:
    """A rope_scaling dict we compute exactly (linear or llama3, with every parameter), or ValueError."""
    if scaling is None:
        return
    kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else None
    if kind not in ROPE_SCALINGS:
        raise ValueError(f"rope_scaling type must be one of {', '.join(ROPE_SCALINGS)}, got {kind!r}")
    missing = [k for k in ROPE_SCALINGS[kind] if not isinstance(scaling.get(k), int | float)]
    if missing:
        raise ValueError(f"rope_scaling of type {kind} needs {', '.join(missing)}")
    if not scaling["factor"] > 0:
        raise ValueError(f"rope_scaling factor must be > 0, got {scaling['factor']}")


@dataclass
class GPTConfig:
    # The family: gpt2 (LayerNorm, tanh-GELU MLP, biases; the recipe options below) or llama (Llama,
    # Qwen2, Mistral: RMSNorm, SwiGLU MLP, rotary positions, grouped-query attention, no biases but
    # an optional q/k/v bias). Both keep GPT-2's module names (train/model.py maps them).
    arch: str = "gpt2"
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
    rope_base: float = 10000.0  # rope_theta: frequencies base ** (-2i / head_dim); read with pos_emb="rope"
    qk_norm: bool = False  # RMS-normalise each head's q and k (learned gain per channel) before rotary
    mlp_act: str = "gelu"  # gelu: tanh-approximate GELU (GPT-2's gelu_new); relu2: relu(x) ** 2
    tie_embeddings: bool = True  # False: the LM head is a matrix of its own, not the token embedding
    zero_init: bool = False  # attn.c_proj, mlp.c_proj (and an untied lm_head) start at zero
    logit_softcap: float = 0.0  # > 0: logits = cap * tanh(logits / cap); 0 = off
    # Shape and numerics fields (0 = derived here, once; the saved config holds the value).
    n_kv_head: int = 0  # key/value heads: < n_head is grouped-query attention (llama only); 0 = n_head
    head_dim: int = 0  # channels per head; 0 = n_embd // n_head (a llama model may set another)
    intermediate_size: int = 0  # the MLP's hidden width; 0 = 4 * n_embd (gpt2) or swiglu_width(n_embd) (llama)
    norm_eps: float = 1e-5  # LayerNorm (gpt2) or RMSNorm (llama) epsilon
    qkv_bias: bool = False  # biases on the q, k and v projections only (Qwen2); llama only
    # rotary frequency scaling: None, {"rope_type": "linear", "factor"} or {"rope_type": "llama3", "factor",
    # "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"} (Hugging Face's keys)
    rope_scaling: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        for name, want in FAMILY_FIXED[self.arch].items():  # the family's own values, GPT-2's defaults give way
            if getattr(self, name) == GPTConfig.__dataclass_fields__[name].default:
                setattr(self, name, want)
            elif getattr(self, name) != want:
                raise ValueError(f"arch={self.arch} has {name}={want!r}, got {getattr(self, name)!r}")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.n_kv_head = self.n_kv_head or self.n_head
        self.head_dim = self.head_dim or self.n_embd // self.n_head
        self.intermediate_size = self.intermediate_size or (
            swiglu_width(self.n_embd) if self.arch == "llama" else 4 * self.n_embd)
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.arch == "gpt2":
            if self.n_embd % self.n_head:
                raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
            for name, value, want in (("n_kv_head", self.n_kv_head, self.n_head),
                                      ("head_dim", self.head_dim, self.n_embd // self.n_head),
                                      ("qkv_bias", self.qkv_bias, False)):
                if value != want:
                    raise ValueError(f"{name} applies to arch=llama (gpt2 has {name}={want}), got {value!r}")
            if self.mlp_act == "swiglu":
                raise ValueError("mlp_act='swiglu' is the llama family's MLP (arch='llama')")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}")
        check_rope_scaling(self.rope_scaling)
        if self.rope_scaling is not None and self.pos_emb != "rope":
            raise ValueError("rope_scaling applies to rotary positions (pos_emb='rope')")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.pos_emb not in POS_EMBS:
            raise ValueError(f"pos_emb must be one of {', '.join(POS_EMBS)}, got {self.pos_emb!r}")
        if self.pos_emb == "rope" and self.head_dim % 2:
            raise ValueError(f"pos_emb='rope' rotates channel pairs: head_dim must be even, got {self.head_dim}")
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
    def qkv_size(self) -> int:
        """Rows of the packed q | k | v projection: (n_head + 2 * n_kv_head) * head_dim."""
        return (self.n_head + 2 * self.n_kv_head) * self.head_dim

    def non_gpt2_options(self) -> list[str]:
        """Options set away from what the family's loaders compute, by field name (empty = expressible).

        For gpt2: anything away from GPT-2's architecture; for llama: the recipe options Llama's
        loaders lack. Exporters to other ecosystems' loaders (Hugging Face, GGUF) refuse a model that
        has any, naming them, instead of writing weights a loader would misread.
        """
        reference = GPT2_ARCHITECTURE if self.arch == "gpt2" else LLAMA_ARCHITECTURE
        return [name for name, value in reference.items() if getattr(self, name) != value]

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count computed from the shape; ``non_embedding`` leaves the position table out."""
        d, L, inner, q = self.n_embd, self.n_layer, self.intermediate_size, self.n_head * self.head_dim
        norm = 2 * d if self.bias else d  # a LayerNorm (with its bias) or an RMSNorm
        per_block = 2 * norm + d * self.qkv_size + q * d
        per_block += (self.qkv_size + d) if self.bias else (self.qkv_size if self.qkv_bias else 0)
        up = 2 * inner if self.mlp_act == "swiglu" else inner  # SwiGLU: gate | up
        per_block += d * up + inner * d + ((inner + d) if self.bias else 0)
        if self.qk_norm:
            per_block += 2 * self.head_dim  # the q and k gains
        n = L * per_block + norm + self.padded_vocab_size * d
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
        return 6 * matmul_params + 12 * self.n_layer * self.n_head * self.head_dim * T

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
    # a Hugging Face model folder to start from (GPT-2, Llama, Qwen2, Mistral): it fixes the architecture and
    # the tokenizer
    init_from: str = ""
    # an artifact or run folder whose tokenizer (and special tokens) the run takes as they are: a draft model
    # for speculative decoding must tokenize exactly as its target
    tokenizer_from: str = ""
    # model
    arch: str = "gpt2"  # gpt2 | llama (GPTConfig.arch: the family)
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
    # llama-family shape (GPTConfig's fields of the same names; 0 = derived from n_embd / n_head)
    n_kv_head: int = 0
    head_dim: int = 0
    intermediate_size: int = 0
    norm_eps: float = 1e-5
    qkv_bias: bool = False
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
        if self.arch == "llama":  # the family's own values; GPT-2's defaults give way (as in GPTConfig)
            for name, want in FAMILY_FIXED["llama"].items():
                if getattr(self, name) == TrainConfig.__dataclass_fields__[name].default:
                    setattr(self, name, want)
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
        need(self.arch in ARCHS, "--arch", f"must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        for flag, v in (("--n-kv-head", self.n_kv_head), ("--head-dim", self.head_dim),
                        ("--intermediate-size", self.intermediate_size)):
            need(isinstance(v, int) and v >= 0, flag, f"must be a positive integer (0 = derived), got {v!r}")
        need(self.norm_eps > 0, "--norm-eps", f"must be > 0, got {self.norm_eps}")
        if self.arch == "gpt2":
            need(self.n_embd % self.n_head == 0, "--n-embd",
                 f"must be divisible by --n-head ({self.n_head}), got {self.n_embd}")
            for name in ("n_kv_head", "head_dim", "qkv_bias"):
                default = TrainConfig.__dataclass_fields__[name].default
                need(getattr(self, name) == default, "--" + name.replace("_", "-"),
                     "applies to --arch llama (GPT-2 has one key/value head per query head, head size "
                     "--n-embd / --n-head and a bias on every projection or none)")
            need(self.mlp_act != "swiglu", "--mlp-act", "swiglu is --arch llama's MLP")
        else:
            for name, want in FAMILY_FIXED["llama"].items():
                need(getattr(self, name) == want, "--" + name.replace("_", "-"),
                     f"--arch llama has {name}={want!r} (rotary positions, a SwiGLU MLP, no biases but --qkv-bias), "
                     f"got {getattr(self, name)!r}")
            need(self.head_dim > 0 or self.n_embd % self.n_head == 0, "--n-embd",
                 f"must be divisible by --n-head ({self.n_head}) unless --head-dim is set, got {self.n_embd}")
            need(self.n_head % (self.n_kv_head or self.n_head) == 0, "--n-kv-head",
                 f"must divide --n-head ({self.n_head}), got {self.n_kv_head}")
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
            need((self.head_dim or self.n_embd // self.n_head) % 2 == 0, "--pos-emb",
                 f"rope rotates channel pairs: the head size (--head-dim, or --n-embd / --n-head) must be even, "
                 f"got {self.head_dim or self.n_embd // self.n_head}")
        else:
            need(self.rope_base == 10000.0, "--rope-base", "only applies with --pos-emb rope")
        need(self.rope_base > 1.0, "--rope-base", f"must be > 1, got {self.rope_base}")
        need(self.mlp_act in MLP_ACTS, "--mlp-act", f"must be one of {', '.join(MLP_ACTS)}, got {self.mlp_act!r}")
        need(self.logit_softcap >= 0, "--logit-softcap", f"must be >= 0 (0 = off), got {self.logit_softcap}")
        need(self.max_time >= 0, "--max-time", f"must be >= 0, got {self.max_time}")

    def model_config(self, vocab_size: int) -> GPTConfig:
        return GPTConfig(arch=self.arch, vocab_size=vocab_size, block_size=self.block_size, n_layer=self.n_layer,
                         n_head=self.n_head, n_embd=self.n_embd, dropout=self.dropout, bias=self.bias,
                         pos_emb=self.pos_emb, rope_base=self.rope_base, qk_norm=self.qk_norm, mlp_act=self.mlp_act,
                         tie_embeddings=self.tie_embeddings, zero_init=self.zero_init,
                         logit_softcap=self.logit_softcap, n_kv_head=self.n_kv_head, head_dim=self.head_dim,
                         intermediate_size=self.intermediate_size, norm_eps=self.norm_eps, qkv_bias=self.qkv_bias)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}
