"""The metadata files other tools look for in a model folder. Torch-free, like ``artifact.py``.

Each file is what one loader reads, measured with the loader itself (field notes, "Interop"):

* ``tokenizer_config.json`` + ``special_tokens_map.json``: transformers' ``AutoTokenizer`` (and
  so Optimum, lm-eval's ``hf`` tokenizer, vLLM, onnxruntime-genai's tokenizer) read the class,
  the special tokens and ``model_max_length`` here; without them eos/bos/pad load as ``None``.
  The class is ``PreTrainedTokenizerFast``: it takes ``tokenizer.json`` as it is, for every
  tokenizer kind, where ``GPT2TokenizerFast`` would rewrite the pre-tokenizer's options.
* ``genai_config.json``: onnxruntime-genai opens a folder only through it. Its decoder types
  ``"phi"`` (for GPT-2-family models) and ``"llama"`` / ``"qwen2"`` / ``"mistral"`` (the llama
  family's own) take the tensor names from the file, so our Optimum-style names go in as ``%d``
  templates; its ``"gpt2"`` type expects other input names ("Model input was not found").
  ``past_present_share_buffer`` is off: ``model.onnx`` returns ``concat(past, new)``.
* ``generation_config.json``: transformers' ``GenerationConfig`` (and our server's defaults).

A model from a Hugging Face folder (or a run started ``--init-from`` one) keeps that folder's
tokenizer_config.json and generation_config.json (``TokenizerFiles``: chat template, bos/eos,
add_bos_token, sampling defaults); our own models get ours, with ``artifact.DEFAULT_CHAT_TEMPLATE``.

``config.json`` itself is ``artifact.gpt2_style_config`` / ``llama_style_config``. This module
ignores weights and graphs; it only describes them.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from nextoken.export.artifact import DEFAULT_CHAT_TEMPLATE, eos_ids, write_json
from nextoken.fileio import atomic_write_text

EOT = "<|endoftext|>"  # the same string as nextoken.train.tokenizer.EOT (which imports the trainer)
UNK = "<unk>"
TOKENIZER_CLASS = "PreTrainedTokenizerFast"


def _added_token(content: str) -> dict[str, Any]:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True}


def special_tokens(tokenizer_kind: str) -> dict[str, str]:
    """bos/eos/pad are ``<|endoftext|>`` (as in GPT-2); unk is ``<unk>`` where the vocabulary has one."""
    tokens = {"bos_token": EOT, "eos_token": EOT, "pad_token": EOT}
    # Byte-level BPE encodes any text, so it has no unknown token; GPT-2 names eos there too.
    tokens["unk_token"] = EOT if tokenizer_kind == "bpe" else UNK
    return tokens


def tokenizer_config(tokenizer_kind: str, *, model_max_length: int, eos_token_id: int,
                     unk_token_id: int | None) -> dict[str, Any]:
    """``tokenizer_config.json`` for ``AutoTokenizer``: no BOS is added (GPT-2's convention).

    Our server puts ``<|endoftext|>`` before every prompt itself (documents are separated by it in
    training); a caller of another runtime who wants the server's tokens does the same. The chat
    template is ours (``artifact.DEFAULT_CHAT_TEMPLATE``).
    """
    decoder = {str(eos_token_id): _added_token(EOT)}
    if tokenizer_kind != "bpe" and unk_token_id is not None:
        decoder[str(unk_token_id)] = _added_token(UNK)
    return {
        "tokenizer_class": TOKENIZER_CLASS,
        **special_tokens(tokenizer_kind),
        "model_max_length": model_max_length,
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": decoder,
        "chat_template": DEFAULT_CHAT_TEMPLATE,
    }


def generation_config(*, block_size: int, eos_token_id: int) -> dict[str, Any]:
    """Default sampling, the same as ``nextoken generate``'s flags.

    ``max_length`` (prompt + new tokens) is the context: transformers stops there instead of
    running past the position table. A ``max_new_tokens`` here would win over every caller's
    ``max_length`` (lm-eval's ``generate_until`` passes one) and overflow it.
    """
    return {"do_sample": True, "temperature": 0.8, "top_k": None, "top_p": 1.0, "max_length": block_size,
            "bos_token_id": eos_token_id, "eos_token_id": eos_token_id, "pad_token_id": eos_token_id}


def genai_config(config: dict[str, Any], *, filename: str = "model.onnx", threads: int | None = None
                 ) -> dict[str, Any]:
    """``genai_config.json`` for onnxruntime-genai over ``filename`` (the Optimum-style graph).

    ``config`` is the artifact's ``config.json``. The decoder type is the llama family's own
    model_type, ``"phi"`` for GPT-2's (module docstring). Search defaults are greedy (genai's own
    defaults); callers set their own per generator.
    """
    session: dict[str, Any] = {"log_id": "onnxruntime-genai", "provider_options": []}
    if threads is not None:
        session.update(intra_op_num_threads=threads, inter_op_num_threads=1)
    eos = eos_ids(config)
    pad = config.get("pad_token_id")
    bos = config.get("bos_token_id")
    model_type = config.get("model_type", "gpt2")
    return {
        "model": {
            "type": "phi" if model_type == "gpt2" else model_type,
            "vocab_size": config["vocab_size"],
            "context_length": config["n_positions"],
            "bos_token_id": eos[0] if bos is None else bos,
            "eos_token_id": eos if len(eos) > 1 else eos[0],
            "pad_token_id": eos[0] if pad is None else pad,
            "decoder": {
                "session_options": session,
                "filename": filename,
                "head_size": config["head_dim"],
                "hidden_size": config["n_embd"],
                "num_attention_heads": config["n_head"],
                "num_key_value_heads": config.get("n_kv_head") or config["n_head"],
                "num_hidden_layers": config["n_layer"],
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"do_sample": False, "num_beams": 1, "max_length": config["n_positions"], "min_length": 0,
                   "past_present_share_buffer": False, "num_return_sequences": 1, "top_k": 1, "top_p": 1.0,
                   "temperature": 1.0, "repetition_penalty": 1.0, "early_stopping": True, "length_penalty": 1.0,
                   "diversity_penalty": 0.0, "no_repeat_ngram_size": 0},
    }


def write_tokenizer_json(source_dir: Path, tokenizer: Any, out: Path) -> None:
    """tokenizer.json as the source folder has it, byte for byte (or as assembled from GPT-2's vocab + merges)."""
    if (source_dir / "tokenizer.json").is_file():
        shutil.copyfile(source_dir / "tokenizer.json", out / "tokenizer.json")
    else:
        atomic_write_text(out / "tokenizer.json", tokenizer.to_str(pretty=True))


def write_tokenizer_files(folder: Path, config: dict[str, Any], hf_tokenizer_config: dict[str, Any] | None = None
                          ) -> None:
    """tokenizer_config.json and special_tokens_map.json beside an existing tokenizer.json.

    ``hf_tokenizer_config``: a Hugging Face folder's, normalised (``TokenizerFiles.tokenizer_config``);
    None: ours.
    """
    if hf_tokenizer_config is not None:
        tc = dict(hf_tokenizer_config)
        special = {k: tc[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if tc.get(k)}
    else:
        kind = config.get("tokenizer_kind", "bpe")
        tc = tokenizer_config(kind, model_max_length=config["n_positions"], eos_token_id=eos_ids(config)[0],
                              unk_token_id=config.get("unk_token_id"))
        special = special_tokens(kind)
    write_json(folder / "tokenizer_config.json", tc)
    write_json(folder / "special_tokens_map.json", special)


def write_artifact_extras(folder: Path, config: dict[str, Any], hf_tokenizer_config: dict[str, Any] | None = None
                          ) -> None:
    """What an ONNX artifact needs beyond our own files so Optimum and onnxruntime-genai open it as is."""
    write_tokenizer_files(folder, config, hf_tokenizer_config)
    write_json(folder / "genai_config.json", genai_config(config))
