"""Tiny Hugging Face model folders as the hub has them, made here (no download): a session fixture for every area.

Four folders, one per tokenizer style and architecture corner, each saved by transformers'
``save_pretrained`` with sharded safetensors (an index and several shards), a ``tokenizer.json``
made with the ``tokenizers`` library, a ``tokenizer_config.json`` with a chat template and a
``generation_config.json``::

    smollm   LlamaConfig    GQA 4:1, tied, rope_theta 1e4, bf16         byte-level BPE (digits split: "smollm")
    llama3   LlamaConfig    GQA 4:2, untied, theta 5e5 + llama3 scaling  tiktoken-style regex BPE, BOS by its
                                                                         post-processor, two eos ids
    qwen2    Qwen2Config    GQA 4:2, tied, q/k/v bias, rope_theta 1e6   Qwen2's regex BPE, NFC, sampling defaults
    mistral  MistralConfig  GQA 4:1, untied, no sliding window, f16      Metaspace + byte-fallback BPE, add_bos_token

Weights are random with a large spread (std 0.3), so logits differ clearly between tokens and a
loader that misplaced one tensor, head or rotary pair produces other greedy tokens.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

CASES = ("smollm", "llama3", "qwen2", "mistral")
CORPUS = ("the cat sat on the mat. the dog lay on the rug! a quick brown fox jumps over the lazy dog 12345.\n"
          "hello world, hello there. how are you? i love next token prediction; café ünïcödé.\n") * 30
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3_CHAT = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
               "{{ m['content'] }}<|eot_id|>{% endfor %}"
               "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
MISTRAL_CHAT = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
PROMPTS = ["the cat", "hello world", "a quick brown", "café 123"]


def _added(content: str, i: int) -> dict[str, Any]:
    return {"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
            "special": True}


def byte_level_tokenizer(pre: Any, specials: list[str], vocab_size: int = 360, normalizer: Any = None) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS], trainer=trainer)
    return tok


def metaspace_tokenizer() -> Any:
    """Llama 2's form: <unk> <s> </s>, the 256 <0xXX> byte pieces, then ▁-pieces and their merges."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    base = Tokenizer(models.BPE())
    base.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    base.train_from_iterator([CORPUS], trainer=trainers.BpeTrainer(vocab_size=200, show_progress=False))
    learned = json.loads(base.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    spec = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [_added(t, i) for i, t in enumerate(("<unk>", "<s>", "</s>"))],
        "normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"},
                                                             {"type": "Replace", "pattern": {"String": " "},
                                                              "content": "\u2581"}]},
        "pre_tokenizer": None,
        "post_processor": {"type": "TemplateProcessing",
                           "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                      {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                    {"Sequence": {"id": "A", "type_id": 0}},
                                    {"SpecialToken": {"id": "<s>", "type_id": 1}},
                                    {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"},
            {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": learned["merges"]},
    }
    return Tokenizer.from_str(json.dumps(spec))


def _tokenizer(case: str) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(tokenizer, tokenizer_config.json, generation_config.json) of a case; ids resolved from the tokenizer."""
    from tokenizers import Regex, normalizers, pre_tokenizers, processors

    from nextoken.export.gguf_llama import LLAMA3_REGEX, QWEN2_REGEX

    if case == "smollm":
        tok = byte_level_tokenizer(pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]),
            ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
        tc = {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
              "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>", "chat_template": CHATML}
        gen = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    elif case == "llama3":
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]
        tok = byte_level_tokenizer(pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), specials)
        tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                           special_tokens=[("<|begin_of_text|>", 0)])
        tc = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
              "chat_template": LLAMA3_CHAT}
        gen = {"bos_token_id": 0, "eos_token_id": [1, 2], "do_sample": True, "temperature": 0.6, "top_p": 0.9}
    elif case == "qwen2":
        tok = byte_level_tokenizer(pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
            ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], normalizer=normalizers.NFC())
        tc = {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
              "pad_token": "<|endoftext|>", "add_bos_token": False, "chat_template": CHATML}
        gen = {"bos_token_id": 0, "eos_token_id": [2, 0], "pad_token_id": 0, "do_sample": True, "temperature": 0.7,
               "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
    else:
        tok = metaspace_tokenizer()
        tc = {"tokenizer_class": "LlamaTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "add_bos_token": True, "add_eos_token": False, "legacy": False, "chat_template": MISTRAL_CHAT}
        gen = {"bos_token_id": 1, "eos_token_id": 2}
    tc["model_max_length"] = 128
    return tok, tc, gen


def make_folder(case: str, out: Path) -> Path:
    """Build the case's model with transformers, random weights, saved as a hub folder would be."""
    import torch
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    tok, tc, gen = _tokenizer(case)
    common = dict(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=128, rms_norm_eps=1e-5,
                  bos_token_id=gen["bos_token_id"], eos_token_id=gen["eos_token_id"])
    if case == "smollm":
        model = LlamaForCausalLM(LlamaConfig(**common, num_key_value_heads=1, tie_word_embeddings=True,
                                             rope_theta=10000.0, pad_token_id=2))
    elif case == "llama3":
        scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 32}
        model = LlamaForCausalLM(LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=False,
                                             rope_theta=500000.0, rope_scaling=scaling))
    elif case == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, num_key_value_heads=2, tie_word_embeddings=True,
                                             rope_theta=1e6, use_sliding_window=False))
    else:
        model = MistralForCausalLM(MistralConfig(**common, num_key_value_heads=1, tie_word_embeddings=False,
                                                 rope_theta=10000.0, sliding_window=None))
    g = torch.Generator().manual_seed(CASES.index(case))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    dtype = {"smollm": torch.bfloat16, "mistral": torch.float16}.get(case)
    if dtype is not None:
        model = model.to(dtype)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size="150KB")
    assert (out / "model.safetensors.index.json").is_file(), "the fixture must be sharded"
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return out


class HFFolders:
    """Each case's folder and its exports, built once per session on first use."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._cache: dict[tuple[str, str], Path] = {}

    def _once(self, case: str, what: str, build: Callable[[Path], Path]) -> Path:
        key = (case, what)
        if key not in self._cache:
            self._cache[key] = build(self.root / what / case)
        return self._cache[key]

    def folder(self, case: str) -> Path:
        return self._once(case, "hf", lambda out: make_folder(case, out))

    def artifact(self, case: str) -> Path:
        from nextoken.export.build import export_run

        return self._once(case, "artifact", lambda out: export_run(self.folder(case), out, log=None))

    def reference(self, case: str) -> Any:
        """transformers' own model over the folder, fp32, eval mode (the reference for every check)."""
        import torch
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.folder(case), torch_dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def hf_folders(tmp_path_factory: pytest.TempPathFactory) -> HFFolders:
    pytest.importorskip("transformers")
    return HFFolders(tmp_path_factory.mktemp("hf-folders"))


def greedy(model: Any, ids: list[int], n: int) -> list[int]:
    """Plain greedy continuation with a full forward pass per token (no cache): the reference."""
    import torch

    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            x = torch.cat([x, model(x).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return x[0, len(ids):].tolist()


def decided_greedy(model: Any, ids: list[int], n: int, margin: float = 1e-2) -> list[int]:
    """``greedy``'s tokens up to the first step whose top two logits lie within ``margin``: another runtime's
    float order (llama.cpp's kernels) may pick either there, so only the tokens before it are determined."""
    import torch

    out = greedy(model, ids, n)
    with torch.no_grad():
        logits = model(torch.tensor([ids + out])).logits[0, len(ids) - 1:]
    for i, row in enumerate(logits[:n]):
        top = row.topk(2).values
        if float(top[0] - top[1]) < margin:
            return out[:i]
    return out
