"""The artifact folder: the one thing serving reads. Torch-free on purpose.

::

    ARTIFACT/
      model.onnx              merged prefill + KV-cache decode graph (model.onnx.data beside it from 256 MiB of weights)
      serving.onnx            the serving graph: the same model over a cache updated in place (serving.py)
      tokenizer.json          Hugging Face tokenizers format
      config.json             a GPT-2 or Llama / Qwen2 / Mistral config.json (transformers reads it) plus the keys
                              our server reads (``artifact_config``)
      generation_config.json  default sampling settings (a Hugging Face folder's own, as it had them)
      tokenizer_config.json   chat_template, bos/eos tokens, add_bos_token, model_max_length for AutoTokenizer
                              (and special_tokens_map.json)
      genai_config.json       lets onnxruntime-genai open the folder as it is
      manifest.json           format version, sha256 of every other file, source checkpoint, export options

``load_artifact`` refuses a folder whose files do not match their recorded hashes, so a
half-copied or tampered artifact never serves. A models folder's ``current`` pointer (a symlink
to a version folder, or a file naming it) is read here too, once for everyone: the registry that
writes it and the server that follows it. What a models folder holds besides, and how versions
are published, is the registry's business (``nextoken.registry``), not this module's.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nextoken.fileio import atomic_write_text, sha256_file

FORMAT = "nextoken-artifact"
FORMAT_VERSION = 1
REQUIRED_FILES = ("model.onnx", "tokenizer.json", "config.json", "generation_config.json")
CURRENT = "current"  # a models folder's pointer to the version that serves
# Hugging Face's classes for the llama family by model_type (the same as nextoken.train.hf_layout's)
LLAMA_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}

def cache_names(prefix: str, n_layer: int) -> list[str]:
    """The graphs' cache tensors by name, layer by layer: ``{prefix}.{i}.key``, ``{prefix}.{i}.value``.

    ``prefix`` is ``past_key_values`` (inputs) or ``present`` (outputs), in both ONNX graphs.
    """
    return [f"{prefix}.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]


class ArtifactError(Exception):
    """An artifact folder that is missing, incomplete, corrupt or of an unknown format."""


def gpt2_style_config(model: dict[str, Any], *, eos_token_id: int, unk_token_id: int | None, name: str,
                      version: str, tokenizer_kind: str, dtype: str = "float32",
                      non_gpt2: dict[str, Any] | None = None) -> dict[str, Any]:
    """config.json from a GPTConfig dict: a GPT-2 config that transformers reads, plus our own keys.

    ``model_type``/``architectures`` make transformers (and so Optimum, vLLM, lm-eval, llama.cpp's
    converter) treat the folder as GPT-2; the remaining GPT-2 fields say what our model is in
    GPT-2's terms (tanh GELU is ``gelu_new``; dropout everywhere is the run's one rate). Keys
    GPT-2 lacks (name, version, head_dim, tokenizer_kind) are what our server reads;
    transformers keeps unknown keys as attributes and ignores them.

    ``non_gpt2`` (option -> value, from ``GPTConfig.non_gpt2_options``) is recorded as
    ``nextoken_architecture``: the ONNX graph computes them, so Optimum and onnxruntime-genai run
    the model as trained, but the GPT-2 fields above do not describe it for a PyTorch rebuild.
    """
    extra = {"nextoken_architecture": dict(non_gpt2)} if non_gpt2 else {}
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "name": name,
        "version": version,
        "vocab_size": model["vocab_size"],
        "n_positions": model["block_size"],
        "n_ctx": model["block_size"],
        "n_embd": model["n_embd"],
        "n_layer": model["n_layer"],
        "n_head": model["n_head"],
        "n_kv_head": model["n_head"],
        "head_dim": model["n_embd"] // model["n_head"],
        "n_inner": model.get("intermediate_size") or 4 * model["n_embd"],
        "activation_function": "gelu_new",
        "layer_norm_epsilon": model.get("norm_eps", 1e-5),
        "resid_pdrop": model.get("dropout", 0.0),
        "embd_pdrop": model.get("dropout", 0.0),
        "attn_pdrop": model.get("dropout", 0.0),
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "use_cache": True,
        "tie_word_embeddings": True,
        **_token_ids(eos_token_id, eos_token_id, eos_token_id),
        "unk_token_id": unk_token_id,
        "tokenizer_kind": tokenizer_kind,
        "torch_dtype": dtype,
        **extra,
    }


def _token_ids(bos: int | None, eos: int | list[int], pad: int | None) -> dict[str, Any]:
    return {"bos_token_id": bos, "eos_token_id": eos, **({"pad_token_id": pad} if pad is not None else {})}


def llama_style_config(model: dict[str, Any], *, model_type: str, eos_token_id: int | list[int],
                       bos_token_id: int | None, pad_token_id: int | None, unk_token_id: int | None, name: str,
                       version: str, tokenizer_kind: str, dtype: str = "float32",
                       non_family: dict[str, Any] | None = None) -> dict[str, Any]:
    """config.json for the llama family (``model_type`` llama, qwen2 or mistral) from a GPTConfig dict.

    What transformers' LlamaConfig / Qwen2Config / MistralConfig read (so Optimum, vLLM and
    onnxruntime-genai's tooling too), then the keys our runner reads under the names it reads for
    every artifact (n_layer, n_head, n_kv_head, head_dim, n_embd, n_positions). ``eos_token_id`` is an
    int or, as a Hugging Face folder may have it, a list (``eos_ids`` reads either).
    """
    extra = {"nextoken_architecture": dict(non_family)} if non_family else {}
    window = {"qwen2": {"use_sliding_window": False, "sliding_window": None, "max_window_layers": model["n_layer"]},
              "mistral": {"sliding_window": None}}.get(model_type, {"attention_bias": False, "mlp_bias": False})
    return {
        "model_type": model_type,
        "architectures": [LLAMA_CLASSES[model_type]],
        "name": name,
        "version": version,
        "vocab_size": model["vocab_size"],
        "hidden_size": model["n_embd"],
        "intermediate_size": model["intermediate_size"],
        "num_hidden_layers": model["n_layer"],
        "num_attention_heads": model["n_head"],
        "num_key_value_heads": model["n_kv_head"],
        "head_dim": model["head_dim"],
        "max_position_embeddings": model["block_size"],
        "rms_norm_eps": model["norm_eps"],
        "rope_theta": model["rope_base"],
        "rope_scaling": model.get("rope_scaling"),
        "tie_word_embeddings": model["tie_embeddings"],
        "hidden_act": "silu",
        **window,
        "attention_dropout": model.get("dropout", 0.0),
        "initializer_range": 0.02,
        "use_cache": True,
        **_token_ids(bos_token_id, eos_token_id, pad_token_id),
        # ours: the runner's names, the same in every artifact
        "n_layer": model["n_layer"],
        "n_head": model["n_head"],
        "n_kv_head": model["n_kv_head"],
        "n_embd": model["n_embd"],
        "n_positions": model["block_size"],
        "unk_token_id": unk_token_id,
        "tokenizer_kind": tokenizer_kind,
        "torch_dtype": dtype,
        **extra,
    }


def artifact_config(model: dict[str, Any], *, model_type: str, eos_token_id: int | list[int], bos_token_id: int | None,
                    pad_token_id: int | None, unk_token_id: int | None, name: str, version: str,
                    tokenizer_kind: str, dtype: str = "float32", non_family: dict[str, Any] | None = None
                    ) -> dict[str, Any]:
    """config.json for a GPTConfig dict: ``gpt2_style_config`` or ``llama_style_config`` by ``model_type``."""
    if model_type == "gpt2":
        eos = eos_ids({"eos_token_id": eos_token_id})[0]
        return gpt2_style_config(model, eos_token_id=eos, unk_token_id=unk_token_id, name=name, version=version,
                                 tokenizer_kind=tokenizer_kind, dtype=dtype, non_gpt2=non_family)
    return llama_style_config(model, model_type=model_type, eos_token_id=eos_token_id, bos_token_id=bos_token_id,
                              pad_token_id=pad_token_id, unk_token_id=unk_token_id, name=name, version=version,
                              tokenizer_kind=tokenizer_kind, dtype=dtype, non_family=non_family)


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def write_manifest(folder: Path, *, name: str, version: str, source: dict[str, Any], export: dict[str, Any],
                   verification: dict[str, Any] | None = None) -> dict[str, Any]:
    """Hash every file in the folder (except the manifest) and write manifest.json last."""
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != "manifest.json" and not p.name.startswith("."):
            files[str(p.relative_to(folder))] = sha256_file(p)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "name": name, "version": version,
                "files": files, "source": source, "export": export, "verification": verification or {}}
    write_json(folder / "manifest.json", manifest)
    return manifest


@dataclass
class Artifact:
    path: Path
    config: dict[str, Any]
    generation_config: dict[str, Any]
    manifest: dict[str, Any]

    @property
    def onnx_path(self) -> Path:
        return self.path / "model.onnx"

    @property
    def tokenizer_path(self) -> Path:
        return self.path / "tokenizer.json"

    @property
    def name(self) -> str:
        return self.manifest.get("name") or self.config.get("name") or self.path.name

    @property
    def version(self) -> str:
        return str(self.manifest.get("version") or self.config.get("version") or "0")

    @property
    def model_id(self) -> str:
        return f"{self.name}:{self.version}"

    @property
    def eos_ids(self) -> list[int]:
        return eos_ids(self.config, self.generation_config)


def eos_ids(config: dict[str, Any], generation_config: dict[str, Any] | None = None) -> list[int]:
    """Every token that ends generation: config.json's ``eos_token_id`` (an int or, as a Hugging Face folder may
    have it, a list) first, then generation_config.json's (Llama-3 instruct models end a turn with <|eot_id|>
    as well as <|end_of_text|>)."""
    generation_config = generation_config or {}
    out: list[int] = []
    for v in (config.get("eos_token_id"), generation_config.get("eos_token_id")):
        for i in (v if isinstance(v, list) else [v]):
            if isinstance(i, int) and not isinstance(i, bool) and i not in out:
                out.append(i)
    return out


# The chat template of a model without one of its own (every model nextoken trains): each message as
# "{Role}: {content}\n" (System, User, Assistant; developer is System), then "Assistant:", after the
# "<|endoftext|>" a document starts with (the bos_token of nextoken's tokenizer_config.json). Export writes
# it into tokenizer_config.json, so transformers, vLLM and lm-eval render the prompt the server feeds.
# Written with the newline as an expression and no whitespace control, so Jinja's defaults and Hugging
# Face's (trim_blocks, lstrip_blocks) render the same text. A renderer that passes no bos_token (lm-eval's
# remote tokenizer, which then sends the text as a completion prompt, where the server adds it) gets none.
DEFAULT_CHAT_TEMPLATE = (
    "{% if bos_token is defined %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] in ('system', 'developer') %}System{% else %}{{ message['role'] | capitalize }}{% endif %}"
    ": {% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
DEFAULT_CHAT_STOP = "\nUser:"  # with the default template: the model must not write the user's next turn


def prompt_prefix_id(config: dict[str, Any]) -> int | None:
    """The token nextoken puts before a text prompt of a model it trained: the ``<|endoftext|>`` its
    training documents started after (config.json's ``prompt_prefix_id``; older artifacts, all trained
    by nextoken, name their ``tokenizer_kind`` instead). A Hugging Face folder's model gets none: its
    prompt is what its own tokenizer makes (its post-processor, e.g. Llama's BOS)."""
    if "prompt_prefix_id" in config:
        v = config["prompt_prefix_id"]
        return int(v) if v is not None else None
    return int(config["eos_token_id"]) if config.get("tokenizer_kind") else None


def pointed_version(pointer: str | Path) -> str | None:
    """The version folder a ``current`` pointer names, or None. One readlink: cheap enough to poll.

    The pointer is a relative symlink to the version folder beside it, or, where the filesystem
    has no symlinks, a file holding the folder's name.
    """
    try:
        return os.path.basename(os.readlink(pointer).rstrip("/")) or None
    except FileNotFoundError:
        return None
    except OSError:  # not a symlink: a pointer file
        try:
            return Path(pointer).read_text(encoding="utf-8").strip() or None
        except OSError:
            return None


def resolve_artifact_dir(path: str | Path) -> Path:
    """The real folder behind ``path``: an artifact folder, or a ``current`` pointer to one."""
    p = Path(path)
    if p.is_file():  # a pointer file: its version folder sits beside it
        p = p.parent / (pointed_version(p) or "")
    return p.resolve()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path} cannot be read as JSON: {e}") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{path} must hold a JSON object")
    return data


def load_artifact(path: str | Path, verify: bool = True) -> Artifact:
    """Read an artifact folder; with ``verify``, check every file against manifest.json's sha256."""
    folder = Path(path)
    if not folder.is_dir():
        raise ArtifactError(f"artifact folder {folder} does not exist")
    if not (folder / "manifest.json").is_file():
        if (folder / CURRENT).exists():
            raise ArtifactError(f"{folder} is a models folder, not one artifact: pass {folder / CURRENT}, which "
                                "follows each version `nextoken retrain` publishes")
        raise ArtifactError(f"{folder} is not an artifact (no manifest.json); create one with `nextoken export`")
    manifest = _read_json(folder / "manifest.json")
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{folder}/manifest.json is not a {FORMAT} manifest")
    if int(manifest.get("format_version", 0)) > FORMAT_VERSION:
        raise ArtifactError(f"{folder} has format version {manifest.get('format_version')}; this nextoken reads "
                            f"up to {FORMAT_VERSION}")
    for name in REQUIRED_FILES:
        if not (folder / name).is_file():
            raise ArtifactError(f"{folder} is incomplete: {name} is missing")
    if verify:
        recorded = manifest.get("files", {})
        for name in REQUIRED_FILES:
            if name not in recorded:
                raise ArtifactError(f"{folder}/manifest.json records no hash for {name}")
        for name, digest in recorded.items():
            f = folder / name
            if not f.is_file():
                raise ArtifactError(f"{folder} is incomplete: {name} is missing")
            if sha256_file(f) != digest:
                raise ArtifactError(f"{f} does not match its sha256 in manifest.json (corrupt or modified)")
    config = _read_json(folder / "config.json")
    for key in ("vocab_size", "n_positions", "n_layer", "n_head", "head_dim", "eos_token_id"):
        if key not in config:
            raise ArtifactError(f"{folder}/config.json lacks {key!r}")
    return Artifact(folder, config, _read_json(folder / "generation_config.json"), manifest)
