"""`nextoken train`: flags mirror TrainConfig fields; a preset and a TOML/YAML file fill in the rest."""

from __future__ import annotations

import argparse
import dataclasses
import typing

from nextoken.train.config import TrainConfig
from nextoken.train.presets import PRESETS

_HELP = {
    "data": "text files, folders, globs or .jsonl files (default: the Python standard library's source)",
    "text_field": "field holding the text in .jsonl inputs",
    "max_corpus_chars": "read at most this many characters of the corpus (0 = all)",
    "tokenizer": "char, word or bpe (byte-level BPE)",
    "init_from": "a Hugging Face model folder (GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM, "
                 "MistralForCausalLM with its tokenizer.json; `nextoken export --format hf` writes one) to continue "
                 "training: it fixes the architecture, tokenizer and starting weights (a preset's architecture gives "
                 "way; such flags are refused); --block-size defaults to its context",
    "tokenizer_from": "an artifact or run folder (or Hugging Face folder) whose tokenizer.json and special tokens "
                      "this run uses as they are, e.g. to train a draft model for `nextoken serve --speculative "
                      "draft --draft-model`, which must tokenize exactly as the served model; fixes --tokenizer "
                      "and --vocab-size (a preset's give way)",
    "arch": "model family: gpt2 (LayerNorm, GELU MLP, biases) or llama (RMSNorm, SwiGLU MLP, rotary positions, "
            "grouped-query attention, no biases: Llama / Qwen2 / Mistral)",
    "n_kv_head": "key/value heads for grouped-query attention (--arch llama; 0 = --n-head)",
    "head_dim": "channels per attention head (--arch llama; 0 = --n-embd / --n-head)",
    "intermediate_size": "MLP hidden width (0 = 4 x --n-embd for gpt2, 8/3 x --n-embd rounded up to 64 for llama)",
    "norm_eps": "LayerNorm / RMSNorm epsilon",
    "qkv_bias": "biases on the q, k and v projections only (Qwen2's; --arch llama)",
    "vocab_size": "vocabulary size for word and bpe tokenizers",
    "tokens_per_step": "tokens per optimizer step; gradient accumulation makes up the difference",
    "max_time": "stop after this many seconds of training (0 = no limit)",
    "dtype": "auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16 or float16 (CUDA)",
    "strategy": "ddp or fsdp under torchrun",
    "resume": "never, auto (newest good checkpoint in --out-dir), or a checkpoint folder",
    "out_dir": "the run folder (config, tokenizer, checkpoints, metrics, plots)",
    "threads": "PyTorch CPU threads (0 = PyTorch's default)",
    "lr_schedule": "steps (cosine decay over --lr-decay-iters) or time (over --max-time or --max-iters, whichever "
                   "ends first: ends decayed on any machine)",
    "pos_emb": "position embeddings: learned (GPT-2's table) or rope (rotary, no table)",
    "rope_base": "rotary frequency base (with --pos-emb rope)",
    "qk_norm": "RMS-normalise queries and keys per head before attention",
    "mlp_act": "MLP activation: gelu (GPT-2's tanh GELU) or relu2 (ReLU squared)",
    "tie_embeddings": "share the token embedding with the LM head (--no-tie-embeddings: a head of its own)",
    "zero_init": "start the blocks' output projections (and an untied head) at zero",
    "logit_softcap": "soft-cap logits at this value, cap * tanh(logits / cap) (0 = off)",
    "doc_mask": "attention and positions restart at every <|endoftext|> inside a training window",
    "optimizer": "adamw, or muon (Muon for the blocks' matrices, AdamW for embeddings, head, gains, biases)",
    "muon_lr": "Muon's peak learning rate (same warmup/decay shape as --learning-rate)",
    "muon_momentum": "Muon's (Nesterov) momentum",
    "muon_ns_steps": "Newton-Schulz iterations per Muon update",
    "fused_adamw": "AdamW's fused kernel on CPU too (faster step; CUDA always uses it)",
}


def add_train_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per TrainConfig field; defaults are None so unset flags never override a preset or file."""
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        help_ = _HELP.get(f.name, "")
        default = f.default if f.default is not dataclasses.MISSING else "[]"
        help_ = f"{help_} (default: {default})".strip()
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif f.name == "data":
            parser.add_argument(flag, nargs="+", default=None, metavar="PATH", help=help_)
        else:
            parser.add_argument(flag, type=kind, default=None, help=help_)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), help="named starting point; flags override it")
    parser.add_argument("--config", help="TOML or YAML file of settings; flags override it")
    add_train_flags(parser)


def overrides_from_args(args: argparse.Namespace) -> dict[str, typing.Any]:
    names = TrainConfig.field_names()
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults < --preset < --config file < flags, validated: what `nextoken train` will run."""
    from nextoken.train.settings import resolve_train_config

    return resolve_train_config(args.preset, args.config, overrides_from_args(args))


def run(args: argparse.Namespace) -> int:
    from nextoken.train.loop import train

    train(config_from_args(args))
    return 0
