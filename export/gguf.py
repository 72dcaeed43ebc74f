"""GGUF for llama.cpp, written directly with the ``gguf`` package (no Hugging Face detour).

The file is what llama.cpp's ``convert_hf_to_gguf.py`` would write for the Hugging Face export
(``hf.py``), made from the checkpoint in one step. The llama family (``arch="llama"``: Llama,
Qwen2, Mistral, from a run or a Hugging Face folder) is written as llama.cpp's ``llama``
architecture with the tokenizer metadata of its style (``gguf_llama.py``); GPT-2-family models as:

* architecture ``gpt2``: ``token_embd``, ``position_embd``, per block ``attn_norm``, ``attn_qkv``,
  ``attn_output``, ``ffn_norm``, ``ffn_up``, ``ffn_down`` (weights and biases), ``output_norm``;
  no ``output`` tensor, as llama.cpp ties the head to ``token_embd`` when it is absent. Our
  ``nn.Linear`` (out, in) layout is already ggml's {in, out}: nothing is transposed (the HF
  converter transposes GPT-2's Conv1D back to this).
* the byte-level BPE tokenizer inside: ``tokenizer.ggml.model = "gpt2"``, pre-tokenizer
  ``"gpt-2"`` (our regex is GPT-2's; field notes), tokens with their types (``<|endoftext|>`` is
  CONTROL), merges, bos = eos = ``<|endoftext|>``, no automatic BOS.
* dtypes as the converter assigns them: ``f32`` everything; ``f16`` and ``q8_0`` the 2-D
  weights except ``position_embd`` (llama.cpp keeps it f32), with 1-D tensors and norms f32;
  a ``q8_0`` tensor whose rows are not a multiple of 32 falls back to f16 (reported).

Character and word tokenizers are refused: llama.cpp's tokenizer models have no whole-word or
character vocabulary with an ``<unk>`` fallback (its ``whitespace`` model drops whitespace;
its BPE drops unknown bytes), so text would be split differently from training.

Both write the special tokens, ``add_bos_token`` and the chat template the export carries (a
Hugging Face folder's own, or ours).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from nextoken.errors import UserError
from nextoken.export.artifact import DEFAULT_CHAT_TEMPLATE
from nextoken.export.gguf_llama import add_llama_hparams, llama_gguf_tensors, vocab_metadata
from nextoken.export.source import RunSource, load_source
from nextoken.fileio import follow_umask

GGUF_DTYPES = ("f32", "f16", "q8_0")
ARCH = "gpt2"
PRE_TOKENIZER = "gpt-2"
_QTYPE = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
          "q8_0": gguf.GGMLQuantizationType.Q8_0}
_FILE_TYPE = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
# Tolerances of the read-back check (dequantized weights against the checkpoint's, max |delta|
# relative to the tensor's max |w|): f16 rounds at 2^-11; q8_0 at half a step of 1/127 of each
# 32-block's max, plus the f16 rounding of that block's scale.
READBACK_TOLERANCE = {"F32": 0.0, "F16": 1e-3, "Q8_0": 1.0 / 254 + 1e-3}


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "(unknown version)"


def gguf_tensors(state: dict[str, torch.Tensor], vocab_size: int, n_layer: int, n_embd: int,
                 inner: int | None = None) -> dict[str, np.ndarray]:
    """Our GPT-2's state dict -> GGUF tensor name -> fp32 array (numpy shape = reversed ggml ne)."""
    inner = inner or 4 * n_embd
    names = {"transformer.wte.weight": "token_embd.weight", "transformer.wpe.weight": "position_embd.weight",
             "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias"}
    per_block = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
                 "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
    bias_size = {"attn_norm": n_embd, "attn_qkv": 3 * n_embd, "attn_output": n_embd, "ffn_norm": n_embd,
                 "ffn_up": inner, "ffn_down": n_embd}
    for i in range(n_layer):
        for ours, theirs in per_block.items():
            for kind in ("weight", "bias"):
                names[f"transformer.h.{i}.{ours}.{kind}"] = f"blk.{i}.{theirs}.{kind}"
    out: dict[str, np.ndarray] = {}
    for ours, theirs in names.items():
        t = state.get(ours)
        if t is None:
            stem = theirs.split(".")[-2]
            if not theirs.endswith(".bias"):
                raise ValueError(f"the model has no {ours}")
            size = n_embd if theirs.startswith("output_norm") else bias_size[stem]
            out[theirs] = np.zeros(size, dtype=np.float32)  # bias=False: GPT-2 with zero biases
            continue
        a = t.detach().float().cpu().numpy()
        if ours == "transformer.wte.weight":
            a = a[:vocab_size]  # (padded_vocab, C) -> (vocab, C)
        out[theirs] = np.ascontiguousarray(a)
    return out


def tensor_qtype(name: str, array: np.ndarray, dtype: str) -> gguf.GGMLQuantizationType:
    """The type llama.cpp's converter gives this tensor for the file type ``dtype`` (before fallback)."""
    if dtype == "f32" or array.ndim <= 1 or name.endswith("_norm.weight") or name == "position_embd.weight":
        return gguf.GGMLQuantizationType.F32
    return _QTYPE[dtype]


def vocabulary(tok_json: dict[str, Any], vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) from a byte-level BPE tokenizer.json, padded to ``vocab_size``."""
    vocab: dict[str, int] = dict(tok_json["model"]["vocab"])
    for added in tok_json.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    by_id = {i: t for t, i in vocab.items()}
    if len(by_id) != len(vocab) or max(by_id) >= vocab_size:
        raise ValueError(f"token ids are not unique or exceed vocab_size {vocab_size}")
    special = {a["content"] for a in tok_json.get("added_tokens", []) if a.get("special")}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(int(gguf.TokenType.CONTROL if by_id[i] in special else gguf.TokenType.NORMAL))
        else:  # ids the model has rows for but the tokenizer never emits
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok_json["model"].get("merges", [])]
    return tokens, types, merges


def _check_bpe(src: RunSource) -> dict[str, Any]:
    """The tokenizer's GGUF fields (``gguf_llama.vocab_metadata``), or a UserError naming what llama.cpp lacks."""
    if src.tokenizer_kind != "bpe":
        raise UserError(f"this model has a {src.tokenizer_kind} tokenizer; GGUF needs byte-level BPE "
                        f"(--tokenizer bpe when training): llama.cpp's tokenizer models have no word or character "
                        f"vocabulary with an <unk> fallback, so it would split text differently. Use --format onnx "
                        f"or --format hf for this model", flag="--format")
    tok_json = json.loads(src.tokenizer.to_str())
    meta = vocab_metadata(tok_json, src.config.vocab_size)
    if src.config.arch == "gpt2" and meta["model"] != "gpt2":
        raise UserError("a GPT-2-family model's GGUF needs a byte-level BPE tokenizer", flag="--format")
    return meta


def _special_tokens(src: RunSource) -> dict[str, Any]:
    """bos / eos / unk / pad ids, add_bos_token and the chat template: the folder's, or ours (eos = bos = pad)."""
    tc = src.files.tokenizer_config if src.files is not None else {}
    ids = {"eos": src.eos_token_id}
    if src.files is None:
        ids.update(bos=src.eos_token_id, pad=src.eos_token_id)
    for kind in ("bos", "unk", "pad"):
        token = tc.get(f"{kind}_token")
        if isinstance(token, str) and src.tokenizer.token_to_id(token) is not None:
            ids[kind] = src.tokenizer.token_to_id(token)
    if src.unk_token_id is not None:
        ids.setdefault("unk", src.unk_token_id)
    return {"ids": ids, "add_bos": bool(tc.get("add_bos_token", False)),
            "chat_template": tc.get("chat_template") if src.files is not None else DEFAULT_CHAT_TEMPLATE}


def expected_tensors(src: RunSource) -> dict[str, np.ndarray]:
    """What the file holds, by GGUF name, in fp32."""
    c = src.config
    if c.arch == "llama":
        return llama_gguf_tensors(src.model.state_dict(), c)
    return gguf_tensors(src.model.state_dict(), c.vocab_size, c.n_layer, c.n_embd, c.intermediate_size)


def _check_out(out: Path) -> None:
    if out.suffix != ".gguf":
        raise UserError(f"a GGUF export is one file; give a path ending in .gguf, got {str(out)!r}", flag="--out")
    if out.is_dir():
        raise UserError(f"{out} is a folder", flag="--out")
    if out.exists():
        with open(out, "rb") as f:
            if f.read(4) != b"GGUF":
                raise UserError(f"{out} exists and is not a GGUF file; refusing to replace it", flag="--out")


def write_gguf(src: RunSource, path: Path, *, dtype: str, name: str) -> dict[str, Any]:
    """Write the GGUF file and return what went in: tensor types, fallbacks, counts."""
    c = src.config
    vocab = _check_bpe(src)
    w = gguf.GGUFWriter(str(path), arch_of(src))
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_context_length(c.block_size)
    w.add_embedding_length(c.n_embd)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_block_count(c.n_layer)
    w.add_head_count(c.n_head)
    if c.arch == "llama":
        add_llama_hparams(w, c)
    else:
        w.add_layer_norm_eps(c.norm_eps)
    w.add_file_type(_FILE_TYPE[dtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_tokenizer_model(vocab["model"])
    w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    if "merges" in vocab:
        w.add_token_merges(vocab["merges"])
    if "scores" in vocab:
        w.add_token_scores(vocab["scores"])
        w.add_add_space_prefix(vocab["add_space_prefix"])
    special = _special_tokens(src)
    for kind, token_id in special["ids"].items():
        getattr(w, f"add_{kind}_token_id")(token_id)
    w.add_add_bos_token(special["add_bos"])
    w.add_add_eos_token(False)
    if special["chat_template"]:
        w.add_chat_template(special["chat_template"])
    qtypes, fallbacks = {}, []
    for tname, array in expected_tensors(src).items():
        qtype = tensor_qtype(tname, array, dtype)
        try:
            data = gguf.quants.quantize(array, qtype)
        except gguf.QuantError:  # rows not a multiple of the block size: the converter's fallback
            fallbacks.append(tname)
            qtype = gguf.GGMLQuantizationType.F16
            data = gguf.quants.quantize(array, qtype)
        w.add_tensor(tname, data, raw_dtype=qtype)
        qtypes[tname] = qtype.name
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"tensors": qtypes, "f16_fallback": fallbacks, "tokens": len(vocab["tokens"]),
            "merges": len(vocab.get("merges", []))}


_KEY_NAMES = {"pad": "padding", "unk": "unknown"}  # GGUF's names for the writer's add_{pad,unk}_token_id


def arch_of(src: RunSource) -> str:
    """llama.cpp's architecture name for the model: ``llama`` for the llama family, else ``gpt2``."""
    return "llama" if src.config.arch == "llama" else ARCH


def read_back(path: Path, src: RunSource) -> dict[str, Any]:
    """Open the file with ``gguf.GGUFReader`` and compare everything with the checkpoint.

    Tensors: names, ggml shapes and dequantized values (max |delta| / max |w| per tensor
    within ``READBACK_TOLERANCE``); tokenizer: tokens, merges, special ids, pre-tokenizer.
    """
    c = src.config
    reader = gguf.GGUFReader(str(path))
    expected = expected_tensors(src)
    problems: list[str] = []
    worst = 0.0
    seen = set()
    for t in reader.tensors:
        seen.add(t.name)
        want = expected.get(t.name)
        if want is None:
            problems.append(f"unexpected tensor {t.name}")
            continue
        if [int(n) for n in t.shape] != list(reversed(want.shape)):
            problems.append(f"{t.name} has ggml shape {list(t.shape)}, expected {list(reversed(want.shape))}")
            continue
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
        scale = float(np.abs(want).max()) or 1.0
        rel = float(np.abs(got - want).max()) / scale
        worst = max(worst, rel)
        tol = READBACK_TOLERANCE.get(gguf.GGMLQuantizationType(t.tensor_type).name, 0.0)
        if rel > tol:
            problems.append(f"{t.name} differs by {rel:.2e} (relative), tolerance {tol:.2e}")
    problems += [f"missing tensor {n}" for n in expected if n not in seen]

    def field(key: str) -> Any:
        f = reader.get_field(key)
        return None if f is None else f.contents()

    vocab = _check_bpe(src)
    special = _special_tokens(src)
    arch = arch_of(src)
    checks = {"general.architecture": arch, "tokenizer.ggml.model": vocab["model"], "tokenizer.ggml.pre": vocab["pre"],
              "tokenizer.ggml.tokens": vocab["tokens"], "tokenizer.ggml.token_type": vocab["types"],
              **{f"tokenizer.ggml.{_KEY_NAMES.get(k, k)}_token_id": v for k, v in special["ids"].items()},
              "tokenizer.ggml.add_bos_token": special["add_bos"],
              f"{arch}.context_length": c.block_size, f"{arch}.block_count": c.n_layer,
              f"{arch}.embedding_length": c.n_embd, f"{arch}.attention.head_count": c.n_head}
    if "merges" in vocab:
        checks["tokenizer.ggml.merges"] = vocab["merges"]
    if "scores" in vocab:
        checks["tokenizer.ggml.scores"] = vocab["scores"]
    if arch == "llama":
        checks.update({"llama.attention.head_count_kv": c.n_kv_head, "llama.rope.freq_base": c.rope_base,
                       "llama.attention.layer_norm_rms_epsilon": c.norm_eps})
    for key, want in checks.items():
        got = field(key)
        if isinstance(want, float) and isinstance(got, float) and abs(got - want) <= 1e-6 * abs(want):
            continue  # stored as float32
        if got != want:
            problems.append(f"{key} reads back as {str(field(key))[:60]}, expected {str(want)[:60]}")
    return {"passed": not problems, "problems": problems, "max_rel_weight_diff": worst,
            "tensors": len(reader.tensors)}


def export_gguf(run_dir: str | Path, out: str | Path, *, checkpoint: str = "best", dtype: str = "f32",
                name: str | None = None, verify: bool = True, log: Callable[[str], None] | None = _stderr) -> Path:
    """Write ``run_dir``'s checkpoint as one GGUF file at ``out`` (``.gguf``) and return its path.

    With ``verify``, the file is read back with the gguf package and checked against the
    checkpoint before it replaces ``out``; a mismatch raises and leaves nothing behind.
    """
    say = log or (lambda _msg: None)
    if dtype not in GGUF_DTYPES:
        raise UserError(f"GGUF exports take {', '.join(GGUF_DTYPES)}, got {dtype!r}", flag="--dtype")
    run_dir, out = Path(run_dir), Path(out)
    _check_out(out)
    src = load_source(run_dir, checkpoint, gpt2_format="gguf")
    _check_bpe(src)
    name = name or run_dir.resolve().name
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        say(f"writing GGUF ({dtype}, llama.cpp architecture {arch_of(src)}) from {src.describe()} ...")
        info = write_gguf(src, tmp, dtype=dtype, name=name)
        if info["f16_fallback"]:
            say(f"  q8_0 needs rows in multiples of 32; kept f16 for {', '.join(info['f16_fallback'])}")
        if verify:
            check = read_back(tmp, src)
            say(f"  read back with gguf {_gguf_version()}: {check['tensors']} tensors, max relative weight "
                f"difference {check['max_rel_weight_diff']:.2e}, tensors and tokenizer "
                f"{'as written' if check['passed'] else 'DIFFERENT'}")
            if not check["passed"]:
                raise UserError("the GGUF file does not read back as written: " + "; ".join(check["problems"][:5])
                                + " (nothing was written; --no-verify skips the check)", flag="--verify")
        follow_umask(tmp)  # the writer's temporary file is private
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    say(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return out
