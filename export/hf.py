"""Hugging Face layout, both ways: a run -> a ``GPT2LMHeadModel`` folder, and such a folder -> our GPT.

Our checkpoint already uses GPT-2's parameter names; two things differ (field notes, "Interop"):

* GPT-2's ``Conv1D`` stores ``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc`` and ``mlp.c_proj``
  weights as (in, out); our ``nn.Linear`` stores (out, in). Those four are transposed.
* our embedding table has ``padded_vocab_size`` rows (a friendlier matmul); the extra rows are
  never looked up and never scored, so the export slices them off and the import pads them back.

The LM head is tied to the embedding on both sides and written once. A model trained with
``bias=False`` is GPT-2 with zero biases, so zeros are written where GPT-2 has biases.

What the folder holds (``export_hf``)::

    HF_DIR/
      model.safetensors        GPT2LMHeadModel state dict (tied lm_head left out, as transformers saves it)
      config.json              GPT-2 config (plus our keys, and "nextoken_export": where it came from)
      generation_config.json   default sampling
      tokenizer.json, tokenizer_config.json, special_tokens_map.json
      README.md                model card: the run's config, losses and how to load it

vLLM, TGI, lm-eval's ``hf`` backend and llama.cpp's ``convert_hf_to_gguf.py`` read this layout.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from nextoken import __version__
from nextoken.errors import UserError
from nextoken.export.artifact import gpt2_style_config, write_json
from nextoken.export.ecosystem import EOT, generation_config, write_tokenizer_files
from nextoken.export.source import RunSource, load_source
from nextoken.fileio import replace_folder
from nextoken.train.config import GPTConfig

CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
HF_TOLERANCE = 1e-4  # max |delta logit| between transformers and our model, fp32
EXPORT_MARKER = "nextoken_export"  # config.json key that says a folder is ours to replace


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def gpt2_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """GPT2LMHeadModel's state dict (tied lm_head left out), name -> shape, in its Conv1D layout."""
    C, V, T = config.n_embd, config.vocab_size, config.block_size
    shapes: dict[str, tuple[int, ...]] = {"transformer.wte.weight": (V, C), "transformer.wpe.weight": (T, C)}
    for i in range(config.n_layer):
        h = f"transformer.h.{i}."
        shapes.update({
            h + "ln_1.weight": (C,), h + "ln_1.bias": (C,),
            h + "attn.c_attn.weight": (C, 3 * C), h + "attn.c_attn.bias": (3 * C,),
            h + "attn.c_proj.weight": (C, C), h + "attn.c_proj.bias": (C,),
            h + "ln_2.weight": (C,), h + "ln_2.bias": (C,),
            h + "mlp.c_fc.weight": (C, 4 * C), h + "mlp.c_fc.bias": (4 * C,),
            h + "mlp.c_proj.weight": (4 * C, C), h + "mlp.c_proj.bias": (C,),
        })
    shapes.update({"transformer.ln_f.weight": (C,), "transformer.ln_f.bias": (C,)})
    return shapes


def to_hf_state_dict(state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """Our GPT's state dict -> GPT2LMHeadModel's (fp32, contiguous, every GPT-2 tensor present)."""
    shapes = gpt2_shapes(config)
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if name == "lm_head.weight":
            continue  # tied to transformer.wte.weight
        if name not in shapes:
            raise ValueError(f"{name} has no GPT-2 counterpart")
        t = t.detach().float().cpu()
        if name.endswith(CONV1D_SUFFIXES):
            t = t.t()  # (out, in) -> Conv1D's (in, out)
        if name == "transformer.wte.weight":
            t = t[: config.vocab_size]  # (padded_vocab, C) -> (vocab, C)
        out[name] = t.contiguous()
    for name, shape in shapes.items():
        if name not in out:
            if not name.endswith(".bias"):
                raise ValueError(f"the model has no {name}")
            out[name] = torch.zeros(shape)  # bias=False: GPT-2 with zero biases
        elif tuple(out[name].shape) != shape:
            raise ValueError(f"{name} has shape {tuple(out[name].shape)}, GPT-2 expects {shape}")
    return out


def from_hf_state_dict(hf: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel's (or GPT2Model's, without the ``transformer.`` prefix) state dict -> our GPT's."""
    shapes = gpt2_shapes(config)
    state: dict[str, torch.Tensor] = {}
    for name, t in hf.items():
        key = name if name.startswith(("transformer.", "lm_head.")) else f"transformer.{name}"
        if key.endswith((".attn.bias", ".attn.masked_bias")) and key not in shapes:
            continue  # GPT-2's causal-mask buffers in old checkpoints, not weights
        if key == "lm_head.weight":
            wte = hf.get("transformer.wte.weight", hf.get("wte.weight"))
            if wte is not None and not torch.equal(t, wte):
                raise UserError("lm_head.weight differs from the embedding (an untied head); nextoken's GPT ties "
                                "them", flag="--init-from")
            continue
        if key not in shapes:
            raise UserError(f"{name} is not a GPT-2 weight", flag="--init-from")
        if tuple(t.shape) != shapes[key]:
            raise UserError(f"{name} has shape {tuple(t.shape)}; config.json implies {shapes[key]}", flag="--init-from")
        t = t.float()
        if key.endswith(CONV1D_SUFFIXES):
            t = t.t()  # Conv1D's (in, out) -> nn.Linear's (out, in)
        if key == "transformer.wte.weight" and config.padded_vocab_size > config.vocab_size:
            pad = torch.zeros(config.padded_vocab_size - config.vocab_size, config.n_embd)
            t = torch.cat([t, pad])  # rows never looked up or scored
        state[key] = t.contiguous()
    missing = [k for k in shapes if k not in state]
    if missing:
        raise UserError(f"the weights lack {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}",
                        flag="--init-from")
    state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


# --- export ------------------------------------------------------------------------------------

def hf_config(src: RunSource, name: str, version: str) -> dict[str, Any]:
    cfg = gpt2_style_config(src.config.to_dict(), eos_token_id=src.eos_token_id, unk_token_id=src.unk_token_id,
                            name=name, version=version, tokenizer_kind=src.tokenizer_kind)
    cfg[EXPORT_MARKER] = {"format": "hf", "nextoken": __version__, "run": str(src.run_dir.resolve()),
                          "checkpoint": src.checkpoint.path.name, "step": src.checkpoint.step}
    return cfg


def _fmt(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, float) else ("-" if x is None else str(x))


def model_card(src: RunSource, name: str, config: dict[str, Any], check: dict[str, Any]) -> str:
    """README.md: the run's architecture, training settings and losses, and how to load the folder."""
    m, t = src.config, src.run_config.get("train", {})
    summary = src.summary
    history = src.eval_history()
    params = sum(p.numel() for p in src.model.parameters())
    lines = [
        "---", "library_name: transformers", "pipeline_tag: text-generation", "tags: [nextoken, gpt2]", "---", "",
        f"# {name}", "",
        f"A GPT-2-architecture model trained from scratch with nextoken "
        f"(next-token prediction), exported from checkpoint `{src.checkpoint.path.name}` "
        f"(step {src.checkpoint.step}) of run `{src.run_dir.name}`.", "",
        "## Model", "",
        "| field | value |", "|---|---|",
        f"| parameters | {params:,} (LM head tied to the embedding) |",
        f"| layers / heads / width | {m.n_layer} / {m.n_head} / {m.n_embd} |",
        f"| context (n_positions) | {m.block_size} |",
        f"| vocabulary | {m.vocab_size} ({src.tokenizer_kind} tokenizer, `{EOT}` = id {src.eos_token_id}) |",
        "| activation | tanh GELU (`gelu_new`), pre-LayerNorm, learned positions |",
        f"| dropout (training) | {m.dropout} |", "",
        "## Training", "",
        "| setting | value |", "|---|---|",
    ]
    for key in ("data", "tokenizer", "max_iters", "batch_size", "tokens_per_step", "learning_rate", "min_lr",
                "warmup_iters", "weight_decay", "beta1", "beta2", "grad_clip", "dtype", "seed"):
        if key in t:
            value = t[key] if key != "data" else (", ".join(t[key]) or "built-in corpus (Python standard library)")
            lines.append(f"| {key} | {value} |")
    lines += ["", "| figure | value |", "|---|---|",
              f"| steps | {_fmt(summary.get('steps', src.checkpoint.step))} |",
              f"| tokens seen | {_fmt(summary.get('tokens_seen', src.meta.get('tokens_seen')))} |",
              f"| train loss (this checkpoint) | {_fmt(src.meta.get('train_loss'))} |",
              f"| val loss (this checkpoint) | {_fmt(src.meta.get('val_loss'))} |",
              f"| best val loss | {_fmt(summary.get('best_val_loss'))} at step {_fmt(summary.get('best_val_step'))} |"]
    if history:
        lines += ["", "Evaluations (mean cross-entropy in nats per token):", "",
                  "| step | train loss | val loss |", "|--:|--:|--:|"]
        lines += [f"| {r['step']} | {_fmt(r.get('train_loss'))} | {_fmt(r.get('val_loss'))} |" for r in history[-12:]]
    lines += ["", "## Use", "",
              "```python",
              "from transformers import AutoTokenizer, GPT2LMHeadModel",
              "tok = AutoTokenizer.from_pretrained(PATH)",
              "model = GPT2LMHeadModel.from_pretrained(PATH)",
              f"# nextoken's server starts every prompt with {EOT} (documents are separated by it in training)",
              f"ids = tok('{EOT}' + 'Once upon a time', return_tensors='pt').input_ids",
              "print(tok.decode(model.generate(ids, max_new_tokens=40, do_sample=False)[0]))",
              "```", "",
              "Also: `lm_eval --model hf --model_args pretrained=PATH ...`, `vllm serve PATH`, "
              "`nextoken export RUN --format gguf` for llama.cpp, `nextoken train --init-from PATH` to continue "
              "training.",
              ""]
    if check:
        lines += ["## Export check", "",
                  f"transformers {check.get('transformers')}: max |delta logit| against the checkpoint "
                  f"{check['max_abs_diff']:.2e} (tolerance {HF_TOLERANCE:g}) on {check['tokens']} positions.", ""]
    return "\n".join(lines)


@torch.no_grad()
def check_with_transformers(folder: Path, src: RunSource, seed: int = 0) -> dict[str, Any] | None:
    """Load ``folder`` with transformers' GPT2LMHeadModel and compare logits with the checkpoint.

    Returns None when transformers is not installed. Inputs: a full-context window and a
    batch of short prompts, so every position row and every token row that occurs is used.
    """
    try:
        import transformers
        from transformers import GPT2LMHeadModel
    except ImportError:
        return None
    hf = GPT2LMHeadModel.from_pretrained(folder).float().eval()
    g = torch.Generator().manual_seed(seed)
    c = src.config
    batches = [torch.randint(0, c.vocab_size, (1, c.block_size), generator=g),
               torch.randint(0, c.vocab_size, (3, min(c.block_size, 8)), generator=g)]
    diff, tokens = 0.0, 0
    for ids in batches:
        ours = src.model(ids).logits  # (B, T, vocab)
        theirs = hf(ids).logits  # (B, T, vocab)
        diff = max(diff, float((ours - theirs).abs().max()))
        tokens += ids.numel()
    return {"transformers": transformers.__version__, "max_abs_diff": diff, "tokens": tokens,
            "passed": diff <= HF_TOLERANCE}


def check_out_folder(out: Path) -> None:
    """Refuse to replace anything but an earlier export of ours (config.json with the marker)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder", flag="--out")
    if out.is_dir() and any(out.iterdir()):
        try:
            ours = EXPORT_MARKER in json.loads((out / "config.json").read_text())
        except (OSError, ValueError, TypeError):
            ours = False
        if not ours:
            raise UserError(f"{out} exists and is not a nextoken Hugging Face export; refusing to replace it",
                            flag="--out")


def export_hf(run_dir: str | Path, out_dir: str | Path, *, checkpoint: str = "best", name: str | None = None,
              version: str | None = None, verify: bool = True, log: Callable[[str], None] | None = _stderr) -> Path:
    """Write ``run_dir``'s checkpoint as a Hugging Face GPT-2 folder at ``out_dir`` and return its path.

    With ``verify`` and transformers installed, the folder is loaded back with
    ``GPT2LMHeadModel`` and its logits compared with the checkpoint's; beyond 1e-4 nothing is
    written. Without transformers the check is reported as skipped.
    """
    say = log or (lambda _msg: None)
    run_dir, out = Path(run_dir), Path(out_dir)
    check_out_folder(out)
    src = load_source(run_dir, checkpoint, gpt2_format="hf")
    name = name or run_dir.resolve().name
    version = str(version) if version is not None else "1"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        say(f"exporting {run_dir} step {src.checkpoint.step} to Hugging Face GPT-2 layout ...")
        weights = to_hf_state_dict(src.model.state_dict(), src.config)
        save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
        config = hf_config(src, name, version)
        write_json(tmp / "config.json", config)
        write_json(tmp / "generation_config.json",
                   generation_config(block_size=src.config.block_size, eos_token_id=src.eos_token_id))
        shutil.copyfile(run_dir / "tokenizer.json", tmp / "tokenizer.json")
        write_tokenizer_files(tmp, config)
        check: dict[str, Any] = {}
        if verify:
            result = check_with_transformers(tmp, src)
            if result is None:
                say("  transformers is not installed: skipped loading the folder back "
                    "(pip install 'nextoken[interop]')")
            else:
                check = result
                say(f"  transformers GPT2LMHeadModel: max|dlogit| {result['max_abs_diff']:.2e}")
                if not result["passed"]:
                    raise UserError(f"transformers' GPT2LMHeadModel disagrees with the checkpoint: max |dlogit| "
                                    f"{result['max_abs_diff']:.2e} > {HF_TOLERANCE:g}; nothing was written "
                                    f"(--no-verify skips the check)", flag="--verify")
        (tmp / "README.md").write_text(model_card(src, name, config, check), encoding="utf-8")
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"wrote {out}")
    return out


# --- import --------------------------------------------------------------------------------------

@dataclass
class HFModel:
    """A GPT-2-layout folder read into our terms."""

    config: GPTConfig
    state_dict: dict[str, torch.Tensor]  # our GPT's names and layout; lm_head tied to the embedding
    tokenizer: Tokenizer  # has <|endoftext|>
    path: Path


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise UserError(msg, flag="--init-from")


def config_from_hf(hf: dict[str, Any], where: Path) -> GPTConfig:
    """GPTConfig from a GPT-2 config.json; a GPT-2 option our GPT cannot express is refused by name."""
    _need(hf.get("model_type") == "gpt2", f"{where}/config.json has model_type {hf.get('model_type')!r}; only "
                                          f"GPT-2 (\"gpt2\") folders can be imported")
    n_embd = hf.get("n_embd", 768)
    checks = {
        "activation_function": (hf.get("activation_function", "gelu_new") in ("gelu_new", "gelu_pytorch_tanh"),
                                "tanh GELU (gelu_new)"),
        "n_inner": (hf.get("n_inner") in (None, 4 * n_embd), f"4 * n_embd = {4 * n_embd}"),
        "layer_norm_epsilon": (abs(float(hf.get("layer_norm_epsilon", 1e-5)) - 1e-5) < 1e-12, "1e-05"),
        "scale_attn_weights": (hf.get("scale_attn_weights", True) is True, "true"),
        "scale_attn_by_inverse_layer_idx": (hf.get("scale_attn_by_inverse_layer_idx", False) is False, "false"),
        "tie_word_embeddings": (hf.get("tie_word_embeddings", True) is True, "true"),
        "add_cross_attention": (hf.get("add_cross_attention", False) is False, "false"),
    }
    for key, (ok, want) in checks.items():
        _need(ok, f"{where}/config.json sets {key} = {hf.get(key)!r}; nextoken's GPT needs {want}")
    try:
        return GPTConfig(vocab_size=int(hf["vocab_size"]), block_size=int(hf.get("n_positions", hf.get("n_ctx"))),
                         n_layer=int(hf["n_layer"]), n_head=int(hf["n_head"]), n_embd=int(n_embd),
                         dropout=float(hf.get("resid_pdrop", 0.0)), bias=True)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{where}/config.json is not a usable GPT-2 config: {e}", flag="--init-from") from None


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    single, index, legacy = folder / "model.safetensors", folder / "model.safetensors.index.json", \
        folder / "pytorch_model.bin"
    if single.is_file():
        return load_file(single)
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(folder / shard))
        return state
    if legacy.is_file():
        # weights_only: a pickle from elsewhere must not run code
        return torch.load(legacy, map_location="cpu", weights_only=True)
    raise UserError(f"{folder} holds no model.safetensors, model.safetensors.index.json or pytorch_model.bin",
                    flag="--init-from")


def _read_tokenizer(folder: Path) -> Tokenizer:
    if (folder / "tokenizer.json").is_file():
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        # A slow-tokenizer GPT-2 folder: the same byte-level BPE, assembled as GPT-2 defines it.
        from tokenizers import decoders, models, pre_tokenizers

        tok = Tokenizer(models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        if tok.token_to_id(EOT) is not None:
            from tokenizers import AddedToken

            tok.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])
    else:
        raise UserError(f"{folder} has no tokenizer.json (nor vocab.json + merges.txt)", flag="--init-from")
    _need(tok.token_to_id(EOT) is not None, f"the tokenizer in {folder} has no {EOT} token, which nextoken uses "
                                             f"between documents and to end generation")
    return tok


def read_hf_config(folder: str | Path) -> GPTConfig:
    """Only the architecture of a GPT-2-layout folder (config.json), for settling a run's config."""
    folder = Path(folder)
    _need(folder.is_dir(), f"{folder} is not a folder")
    try:
        hf = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{folder}/config.json cannot be read: {e}", flag="--init-from") from None
    return config_from_hf(hf, folder)


def load_hf_gpt2(folder: str | Path) -> HFModel:
    """Read a GPT-2-layout Hugging Face folder (ours or anyone's) as our GPT's config, weights and tokenizer."""
    folder = Path(folder)
    config = read_hf_config(folder)
    tok = _read_tokenizer(folder)
    _need(tok.get_vocab_size() <= config.vocab_size,
          f"the tokenizer has {tok.get_vocab_size()} tokens but config.json's vocab_size is {config.vocab_size}")
    state = from_hf_state_dict(_read_weights(folder), config)
    return HFModel(config, state, tok, folder)


def init_from_hf(folder: str | Path, *, dropout: float, block_size: int) -> HFModel:
    """``load_hf_gpt2`` for ``nextoken train --init-from``: the folder fixes the architecture.

    ``dropout`` is the run's training choice (GPT-2 folders record their own, not ours to keep);
    ``block_size`` is the run's training window, which must fit the folder's position table.
    """
    model = load_hf_gpt2(folder)
    if block_size > model.config.block_size:
        raise UserError(f"{block_size} exceeds the n_positions ({model.config.block_size}) of {folder}",
                        flag="--block-size")
    model.config = dataclasses.replace(model.config, dropout=dropout)
    return model
