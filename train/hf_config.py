"""A Hugging Face ``config.json`` -> ``GPTConfig``, or a refusal naming the field we cannot compute.

GPT-2 (``model_type`` gpt2) and the llama family (llama, qwen2, mistral) are read; each field
that changes what the model computes is either mapped or, when our model would compute
something else, refused before any weight is read::

    hidden_size, num_hidden_layers, num_attention_heads   n_embd, n_layer, n_head
    num_key_value_heads (default: num_attention_heads)    n_kv_head
    head_dim (default: hidden_size / num_attention_heads) head_dim
    intermediate_size, rms_norm_eps, rope_theta           intermediate_size, norm_eps, rope_base
    rope_scaling: null, linear or llama3                  rope_scaling (others refused)
    tie_word_embeddings                                   tie_embeddings
    max_position_embeddings                               block_size
    qwen2: q/k/v biases                                   qkv_bias
    hidden_act silu; no attention_bias / mlp_bias (llama), no sliding window shorter than the
    context (mistral's sliding_window, qwen2's use_sliding_window), no experts

The module reads one JSON file and imports nothing but our config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nextoken.errors import UserError
from nextoken.train.config import ROPE_SCALINGS, GPTConfig, check_rope_scaling
from nextoken.train.hf_layout import LLAMA_FAMILY

MODEL_TYPES = ("gpt2", *LLAMA_FAMILY)
# config.json keys that mean mixture-of-experts layers (Mixtral, Qwen2-MoE, DeepSeek, ...)
EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size")


def read_config_json(folder: Path, flag: str) -> dict[str, Any]:
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder", flag=flag)
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{folder}/config.json cannot be read: {e}", flag=flag) from None
    if not isinstance(raw, dict):
        raise UserError(f"{folder}/config.json must hold a JSON object", flag=flag)
    return raw


def hf_config(hf: dict[str, Any], where: Path, flag: str = "--init-from") -> GPTConfig:
    """GPTConfig from a config.json; what our GPT cannot express is refused by name."""
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise UserError(f"{where}/config.json has model_type {model_type!r}; nextoken reads "
                        f"{', '.join(MODEL_TYPES)} folders", flag=flag)
    try:
        return _gpt2_config(hf, where, flag) if model_type == "gpt2" else _llama_config(hf, where, flag)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{where}/config.json is not a usable {model_type} config: {e!r}", flag=flag) from None


def _refuse(where: Path, flag: str, key: str, value: Any, want: str) -> None:
    raise UserError(f"{where}/config.json sets {key} = {value!r}; nextoken's model needs {want}", flag=flag)


def _gpt2_config(hf: dict[str, Any], where: Path, flag: str) -> GPTConfig:
    n_embd = int(hf.get("n_embd", 768))
    checks = {
        "activation_function": (hf.get("activation_function", "gelu_new") in ("gelu_new", "gelu_pytorch_tanh"),
                                "tanh GELU (gelu_new)"),
        "scale_attn_weights": (hf.get("scale_attn_weights", True) is True, "true"),
        "scale_attn_by_inverse_layer_idx": (hf.get("scale_attn_by_inverse_layer_idx", False) is False, "false"),
        "tie_word_embeddings": (hf.get("tie_word_embeddings", True) is True, "true"),
        "add_cross_attention": (hf.get("add_cross_attention", False) is False, "false"),
    }
    for key, (ok, want) in checks.items():
        if not ok:
            _refuse(where, flag, key, hf.get(key), want)
    return GPTConfig(vocab_size=int(hf["vocab_size"]), block_size=int(hf.get("n_positions", hf.get("n_ctx"))),
                     n_layer=int(hf["n_layer"]), n_head=int(hf["n_head"]), n_embd=n_embd,
                     dropout=float(hf.get("resid_pdrop", 0.0)), bias=True,
                     intermediate_size=int(hf.get("n_inner") or 4 * n_embd),
                     norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)))


def _rope(hf: dict[str, Any], where: Path, flag: str) -> tuple[float, dict[str, Any] | None]:
    """rope_theta and a rope_scaling we compute exactly (transformers 4's keys, or 5's rope_parameters)."""
    params = hf.get("rope_parameters") or {}
    theta = float(hf.get("rope_theta", params.get("rope_theta", 10000.0)))
    scaling = hf.get("rope_scaling") or ({k: v for k, v in params.items() if k != "rope_theta"} or None)
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else scaling
        if kind == "default":
            return theta, None
        try:
            check_rope_scaling(scaling)
        except ValueError as e:
            key = "rope_scaling" if "rope_scaling" in hf else "rope_parameters"
            raise UserError(f"{where}/config.json sets {key} = {scaling!r}: {e} (nextoken computes "
                            f"{' and '.join(ROPE_SCALINGS)} scaling exactly, and approximates none)",
                            flag=flag) from None
        scaling = {"rope_type": kind, **{k: scaling[k] for k in ROPE_SCALINGS[kind]}}
    if float(hf.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0))) != 1.0:
        _refuse(where, flag, "partial_rotary_factor", hf.get("partial_rotary_factor"), "1 (every channel rotates)")
    return theta, scaling


def _llama_config(hf: dict[str, Any], where: Path, flag: str) -> GPTConfig:
    model_type = hf["model_type"]
    for key in EXPERT_KEYS:
        if hf.get(key):
            _refuse(where, flag, key, hf[key], "dense MLP layers (mixture-of-experts layers are not supported)")
    if hf.get("hidden_act", "silu") != "silu":
        _refuse(where, flag, "hidden_act", hf.get("hidden_act"), "silu (SwiGLU)")
    for key in ("attention_bias", "mlp_bias"):  # Llama's: biases on every projection (o_proj, down_proj too)
        if hf.get(key):
            _refuse(where, flag, key, hf[key], "false (only Qwen2's q/k/v biases are supported)")
    context = int(hf["max_position_embeddings"])
    window = hf.get("sliding_window")
    if model_type == "qwen2" and not hf.get("use_sliding_window", False):
        window = None  # Qwen2 records a window it does not use
    if window is not None and int(window) < context:
        key = "use_sliding_window" if model_type == "qwen2" else "sliding_window"
        _refuse(where, flag, key, hf.get(key), f"attention over the whole context: a sliding window ({window}) "
                f"shorter than max_position_embeddings ({context}) would be approximated")
    theta, scaling = _rope(hf, where, flag)
    n_embd, n_head = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    return GPTConfig(arch="llama", vocab_size=int(hf["vocab_size"]), block_size=context,
                     n_layer=int(hf["num_hidden_layers"]), n_head=n_head, n_embd=n_embd,
                     n_kv_head=int(hf.get("num_key_value_heads") or n_head),
                     head_dim=int(hf.get("head_dim") or n_embd // n_head),
                     intermediate_size=int(hf["intermediate_size"]), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                     rope_base=theta, rope_scaling=scaling,
                     tie_embeddings=bool(hf.get("tie_word_embeddings", False)), qkv_bias=model_type == "qwen2",
                     dropout=float(hf.get("attention_dropout", 0.0)))
