"""A hub-shaped model folder made here for the benchmarks (random weights; nothing is downloaded).

``smollm2-135m``: SmolLM2-135M's shape (LlamaForCausalLM: 30 layers, 576 wide, 9 heads, 3 key/value
heads, intermediate 1536, vocabulary 49152, tied head, rope_theta 1e5, context 2048 here) with a
byte-level BPE of 49152 tokens trained on the built-in corpus, saved as the hub has it (sharded
safetensors in bf16, tokenizer.json, tokenizer_config.json with a ChatML template,
generation_config.json). Random weights do not change throughput under ``ignore_eos``.

``export_measured`` runs ``nextoken export`` in a child process and reports its wall time and peak
RSS (the child's own ``ru_maxrss``, from ``os.wait4``), the figures issue 21 asks for.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, rms_norm_eps=1e-5,
               rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _tokenizer(vocab_size: int):  # noqa: ANN202 (tokenizers.Tokenizer)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from nextoken.train.sources import default_corpus_files  # the standard library's text: no download

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>",
                                                                         "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([str(p) for p in default_corpus_files()], trainer=trainer)
    assert tok.get_vocab_size() == vocab_size, f"the corpus gave {tok.get_vocab_size()} tokens, not {vocab_size}"
    return tok


def make_smollm2_folder(out: Path) -> Path:
    """SmolLM2-135M's shape with random weights, as a hub folder; made once (reused when present)."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    print(f"making a SmolLM2-135M-shaped folder (random weights) in {out} ...", file=sys.stderr)
    tok = _tokenizer(SMOLLM2["vocab_size"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2)).to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size="100MB")
    tok.save(str(out / "tokenizer.json"))
    tc = {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
          "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>", "chat_template": CHATML,
          "model_max_length": SMOLLM2["max_position_embeddings"]}
    (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2,
                                                            "pad_token_id": 2}, indent=2))
    return out


def export_measured(source: Path, out: Path, *flags: str) -> dict[str, float]:
    """``nextoken export SOURCE --out OUT FLAGS`` in a child: {"seconds", "peak_rss_mb"}."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "nextoken", "export", str(source), "--out", str(out), *flags])
    _pid, status, usage = os.wait4(proc.pid, 0)  # this child's own peak, not the largest child's so far
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, proc.args)
    return {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024}
