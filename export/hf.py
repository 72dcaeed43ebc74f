"""Hugging Face export: a run -> a ``GPT2LMHeadModel`` folder, or for the llama family a ``LlamaForCausalLM`` /
``Qwen2ForCausalLM`` one (the way back is ``nextoken.train.hf_import``; the layouts are ``train/hf_layout``).

The llama family's tensors are cut from ours as ``hf_layout.llama_names`` says (q | k | v and
gate | up are rows of our packed matrices); its config.json is ``artifact.llama_style_config``.
For GPT-2, our checkpoint already uses GPT-2's parameter names; two things differ (field notes,
"Interop"):

* GPT-2's ``Conv1D`` stores ``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc`` and ``mlp.c_proj``
  weights as (in, out); our ``nn.Linear`` stores (out, in). Those four are transposed.
* our embedding table has ``padded_vocab_size`` rows (a friendlier matmul); the extra rows are
  never looked up and never scored, so the export slices them off.

The LM head is tied to the embedding on both sides and written once. A model trained with
``bias=False`` is GPT-2 with zero biases, so zeros are written where GPT-2 has biases.

What the folder holds (``export_hf``)::

    HF_DIR/
      model.safetensors        the model's state dict (tied lm_head left out, as transformers saves it)
      config.json              GPT-2 / Llama / Qwen2 config (plus our keys, and "nextoken_export": where it came from)
      generation_config.json   default sampling
      tokenizer.json, tokenizer_config.json, special_tokens_map.json
      README.md                model card: the run's config, losses and how to load it

vLLM, TGI, lm-eval's ``hf`` backend and llama.cpp's ``convert_hf_to_gguf.py`` read this layout.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from nextoken import __version__
from nextoken.errors import UserError
from nextoken.export.artifact import write_json
from nextoken.export.ecosystem import EOT, write_tokenizer_files, write_tokenizer_json
from nextoken.export.source import RunSource, load_source, name_and_version
from nextoken.fileio import staged_folder
from nextoken.train.config import GPTConfig
from nextoken.train.hf_layout import CONV1D_SUFFIXES, gpt2_shapes, to_llama_tensors

HF_TOLERANCE = 1e-4  # max |delta logit| between transformers and our model, fp32
EXPORT_MARKER = "nextoken_export"  # config.json key that says a folder is ours to replace


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


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


def hf_state_dict(src: RunSource) -> dict[str, torch.Tensor]:
    """The model's weights in its family's Hugging Face layout (fp32, contiguous)."""
    state = src.model.state_dict()
    if src.config.arch == "gpt2":
        return to_hf_state_dict(state, src.config)
    return {name: t.float().contiguous() for name, t in to_llama_tensors(state, src.config)}


def hf_config(src: RunSource, name: str, version: str) -> dict[str, Any]:
    cfg = src.config_json(name, version)
    cfg[EXPORT_MARKER] = {"format": "hf", "nextoken": __version__, **src.record()}
    return cfg


def _fmt(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, float) else ("-" if x is None else str(x))


def _training_lines(src: RunSource, t: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    """The model card's training settings and losses (a run's export only)."""
    assert src.checkpoint is not None
    lines = ["## Training", "", "| setting | value |", "|---|---|"]
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
    return lines


def model_card(src: RunSource, name: str, config: dict[str, Any], check: dict[str, Any]) -> str:
    """README.md: the run's architecture, training settings and losses, and how to load the folder."""
    m, t = src.config, src.run_config.get("train", {})
    summary = src.summary if not src.is_hf else {}
    history = src.eval_history() if not src.is_hf else []
    params = sum(p.numel() for p in src.model.parameters())
    where = (f"converted from the Hugging Face folder `{src.run_dir.name}`" if src.checkpoint is None else
             f"trained with nextoken (next-token prediction), exported from checkpoint "
             f"`{src.checkpoint.path.name}` (step {src.checkpoint.step}) of run `{src.run_dir.name}`")
    cls = config["architectures"][0]
    lines = [
        "---", "library_name: transformers", "pipeline_tag: text-generation",
        f"tags: [nextoken, {src.model_type}]", "---", "",
        f"# {name}", "",
        f"A {cls} model {where}.", "",
        "## Model", "",
        "| field | value |", "|---|---|",
        f"| parameters | {params:,} (LM head {'tied to the embedding' if m.tie_embeddings else 'of its own'}) |",
        f"| layers / heads (key/value) / width | {m.n_layer} / {m.n_head} ({m.n_kv_head}) / {m.n_embd} |",
        f"| context | {m.block_size} |",
        f"| vocabulary | {m.vocab_size} ({src.tokenizer_kind} tokenizer, end of text = id {src.eos_token_id}) |",
        "| activation | " + ("tanh GELU (`gelu_new`), pre-LayerNorm, learned positions" if m.arch == "gpt2" else
                           f"SwiGLU, RMSNorm, rotary positions (theta {m.rope_base:g})") + " |",
        f"| dropout (training) | {m.dropout} |", "",
    ]
    if src.checkpoint is not None:
        lines += _training_lines(src, t, summary)
    if history:
        lines += ["", "Evaluations (mean cross-entropy in nats per token):", "",
                  "| step | train loss | val loss |", "|--:|--:|--:|"]
        lines += [f"| {r['step']} | {_fmt(r.get('train_loss'))} | {_fmt(r.get('val_loss'))} |" for r in history[-12:]]
    lines += ["", "## Use", "",
              "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "tok = AutoTokenizer.from_pretrained(PATH)",
              "model = AutoModelForCausalLM.from_pretrained(PATH)",
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
    """Load ``folder`` with transformers' AutoModelForCausalLM and compare logits with the checkpoint.

    Returns None when transformers is not installed. Inputs: a full-context window and a
    batch of short prompts, so every position row and every token row that occurs is used.
    """
    try:
        import transformers
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None
    hf = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(seed)
    c = src.config
    batches = [torch.randint(0, c.vocab_size, (1, min(c.block_size, 256)), generator=g),
               torch.randint(0, c.vocab_size, (3, min(c.block_size, 8)), generator=g)]
    diff, tokens = 0.0, 0
    for ids in batches:
        ours = src.model(ids).logits  # (B, T, vocab)
        theirs = hf(ids).logits  # (B, T, vocab)
        diff = max(diff, float((ours - theirs).abs().max()))
        tokens += ids.numel()
    return {"transformers": transformers.__version__, "class": type(hf).__name__, "max_abs_diff": diff,
            "tokens": tokens, "passed": diff <= HF_TOLERANCE}


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
    """Write ``run_dir``'s checkpoint as a Hugging Face folder of its family at ``out_dir`` and return its path.

    With ``verify`` and transformers installed, the folder is loaded back with
    ``AutoModelForCausalLM`` and its logits compared with the checkpoint's; beyond 1e-4 nothing is
    written. Without transformers the check is reported as skipped.
    """
    say = log or (lambda _msg: None)
    run_dir, out = Path(run_dir), Path(out_dir)
    check_out_folder(out)
    src = load_source(run_dir, checkpoint, gpt2_format="hf")
    name, version = name_and_version(run_dir, name, version)
    with staged_folder(out) as tmp:
        config = hf_config(src, name, version)
        say(f"exporting {src.describe()} to Hugging Face {config['architectures'][0]} layout ...")
        save_file(hf_state_dict(src), tmp / "model.safetensors", metadata={"format": "pt"})
        write_json(tmp / "config.json", config)
        write_json(tmp / "generation_config.json", src.generation_config())
        write_tokenizer_json(run_dir, src.tokenizer, tmp)
        write_tokenizer_files(tmp, config, src.files.tokenizer_config if src.files else None)
        check: dict[str, Any] = {}
        if verify:
            result = check_with_transformers(tmp, src)
            if result is None:
                say("  transformers is not installed: skipped loading the folder back "
                    "(pip install 'nextoken[interop]')")
            else:
                check = result
                say(f"  transformers {result['class']}: max|dlogit| {result['max_abs_diff']:.2e}")
                if not result["passed"]:
                    raise UserError(f"transformers' {result['class']} disagrees with the checkpoint: max |dlogit| "
                                    f"{result['max_abs_diff']:.2e} > {HF_TOLERANCE:g}; nothing was written "
                                    f"(--no-verify skips the check)", flag="--verify")
        (tmp / "README.md").write_text(model_card(src, name, config, check), encoding="utf-8")
    say(f"wrote {out}")
    return out


