"""A run's settings, settled: defaults < preset < config file < flags, then the rules of where it starts.

A resume of the run in ``--out-dir`` keeps that run's saved settings, changing only what a
resume may change (``RESUMABLE``); an ``--init-from`` folder fixes the architecture and the
tokenizer (``INIT_FROM_FIXED``). The fields themselves and their checks are ``config``'s.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from nextoken.errors import UserError
from nextoken.train.config import FAMILY_FIXED, GPT2_ARCHITECTURE, TrainConfig
from nextoken.train.presets import PRESETS


def load_config_file(path: str) -> dict[str, Any]:
    """Read a TOML or YAML file of TrainConfig fields (dashes or underscores)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {path!r} does not exist", flag="--config")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix == ".toml":
            import tomllib

            raw = tomllib.loads(text)
        elif p.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text) or {}
        elif p.suffix == ".json":
            raw = json.loads(text)
        else:
            raise UserError(f"{path!r}: use a .toml, .yaml or .json file", flag="--config")
    except UserError:
        raise
    except Exception as e:  # the parsers' own errors name the line
        raise UserError(f"{path!r} could not be parsed: {e}", flag="--config") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path!r} must hold a table of settings", flag="--config")
    out = {}
    names = TrainConfig.field_names()
    for key, value in raw.items():
        k = key.replace("-", "_")
        if k not in names:
            raise UserError(f"{path!r}: unknown setting {key!r}", flag="--config")
        out[k] = value
    return out


def resolve_train_config(preset: str | None, config_file: str | None, overrides: dict[str, Any]) -> TrainConfig:
    """Defaults < preset < config file < flags; a resume continues the run in ``--out-dir`` instead.

    With ``--resume`` (auto, or a checkpoint of that folder) and a run already in the folder, its
    saved settings are the run's: see ``resumed_settings``.
    """
    merged: dict[str, Any] = {}
    if preset:
        if preset not in PRESETS:
            raise UserError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}", flag="--preset")
        merged.update(PRESETS[preset])
    from_file = load_config_file(config_file) if config_file else {}
    merged.update(from_file)
    explicit = {k: v for k, v in overrides.items() if v is not None}
    merged.update(explicit)
    if merged.get("arch") == "llama" and preset:
        # The preset's GPT-2-family options (its recipe's ReLU^2, say) give way to the llama family's own.
        for name in FAMILY_FIXED["llama"]:
            if name in PRESETS[preset] and name not in from_file and name not in explicit:
                del merged[name]
    saved = saved_run_settings(merged)
    if saved is not None:
        return TrainConfig(**resumed_settings(saved, merged, preset=preset, explicit=set(from_file) | set(explicit)))
    if merged.get("init_from"):
        merged.update(init_from_settings(merged["init_from"], {**from_file, **explicit}))
    if merged.get("tokenizer_from"):
        merged.update(tokenizer_from_settings(merged, {**from_file, **explicit}))
    return TrainConfig(**merged)


# What a resume may change: the budget, how often it evaluates, logs, samples and keeps checkpoints,
# and where and how it computes. Everything else (data, tokenizer, architecture, optimisation) is the
# run's own: a different value would train another run under this one's name.
RESUMABLE = ("max_iters", "max_time", "eval_interval", "eval_iters", "log_interval", "sample_tokens", "keep_last",
             "overfit_patience", "plot_log_scale", "tensorboard", "progress", "device", "dtype", "compile",
             "activation_checkpointing", "strategy", "threads", "resume", "out_dir")


def _default(name: str) -> Any:
    f = TrainConfig.__dataclass_fields__[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def resumes_own_run(resume: str, run_dir: Path) -> bool:
    """``--resume`` continues the run saved in ``run_dir``: auto, or a checkpoint of that folder."""
    if resume == "never" or not (run_dir / "config.json").is_file():
        return False
    return resume == "auto" or (run_dir / "checkpoints").resolve() in Path(resume).resolve().parents


def saved_run_settings(requested: dict[str, Any]) -> dict[str, Any] | None:
    """The TrainConfig fields saved in ``out_dir/config.json`` when this is a resume of that run, else None.

    A resume of the folder's run: ``--resume auto``, or ``--resume`` naming a checkpoint inside
    ``out_dir/checkpoints``. A checkpoint from elsewhere starts a new run from its weights (what
    ``retrain`` does with a published version), so the requested settings stand.
    """
    run_dir = Path(requested.get("out_dir", TrainConfig.out_dir))
    if not resumes_own_run(requested.get("resume", "never"), run_dir):
        return None
    try:
        saved = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))["train"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{run_dir / 'config.json'} is not a run config ({e}); a resume continues the run saved "
                        "there", flag="--resume") from None
    names = TrainConfig.field_names()
    return {k: v for k, v in saved.items() if k in names}


def resumed_settings(saved: dict[str, Any], requested: dict[str, Any], *, preset: str | None,
                     explicit: set[str]) -> dict[str, Any]:
    """The saved run's settings with the requested changes that a resume may make.

    A setting asked for (by a flag, the config file or the preset) with another value than the run
    was trained with is refused by name, unless it is in ``RESUMABLE``; asking for the same value
    again is fine, so a torchrun restart may repeat its whole command line.
    """
    out = dict(saved, out_dir=requested.get("out_dir", TrainConfig.out_dir))  # where it is now, if it moved
    for name, value in requested.items():
        if name in RESUMABLE:
            out[name] = value
            continue
        was = saved[name] if name in saved else _default(name)  # a field newer than the run: its default
        if value == was:
            continue
        flag = "--" + name.replace("_", "-")
        source = f"--preset {preset} sets it to" if name not in explicit and preset else "asked for"
        raise UserError(f"the run in {requested.get('out_dir', TrainConfig.out_dir)} was trained with {name}={was!r} "
                        f"({source} {value!r}); a resume continues that run as it was, changing only "
                        f"{', '.join('--' + n.replace('_', '-') for n in RESUMABLE[:-2])}. To train otherwise, "
                        "start a new --out-dir (--init-from takes a finished run's export)", flag=flag)
    return out


def tokenizer_from_settings(merged: dict[str, Any], explicit: dict[str, Any]) -> dict[str, Any]:
    """The tokenizer kind and size of a --tokenizer-from folder (set them too, or --init-from, and be refused)."""
    from nextoken.train.hf_tokens import read_tokenizer
    from nextoken.train.tokenizer import tokenizer_kind

    folder = merged["tokenizer_from"]
    for name in ("tokenizer", "vocab_size", "init_from"):
        if name in explicit or (name == "init_from" and merged.get(name)):
            raise UserError(f"--tokenizer-from {folder} fixes the tokenizer; drop --{name.replace('_', '-')}",
                            flag="--" + name.replace("_", "-"))
    if not Path(folder).is_dir():
        raise UserError(f"{folder} is not a folder", flag="--tokenizer-from")
    tok = read_tokenizer(Path(folder), "--tokenizer-from")
    return {"tokenizer": tokenizer_kind(tok), "vocab_size": tok.get_vocab_size()}


# What an --init-from folder fixes: the architecture (GPTConfig's fields), the tokenizer, and the
# starting weights (so zero_init, an initialisation choice, has nothing to act on).
INIT_FROM_FIXED = ("tokenizer", "vocab_size", "arch", "n_layer", "n_head", "n_embd", "bias", "rope_base", "zero_init",
                   "n_kv_head", "head_dim", "intermediate_size", "norm_eps", "qkv_bias", *GPT2_ARCHITECTURE)


def init_from_settings(folder: str, explicit: dict[str, Any]) -> dict[str, Any]:
    """The TrainConfig fields a Hugging Face folder sets, so the run's config.json says what it trains.

    Setting one of them too (a flag or the config file) is refused by name: the weights cannot
    take another shape. A preset's architecture gives way to the folder's. The training window
    (``block_size``) defaults to the folder's context and may be shorter.
    """
    from nextoken.train.hf_import import read_hf_config

    for name in INIT_FROM_FIXED:
        if name in explicit:
            raise UserError(f"--init-from {folder} fixes the architecture and the tokenizer; drop --"
                            f"{name.replace('_', '-')}", flag="--" + name.replace("_", "-"))
    g = read_hf_config(folder)
    fixed = {name: getattr(g, name) for name in INIT_FROM_FIXED if name != "tokenizer"}
    fixed["tokenizer"] = "bpe"
    if g.arch == "gpt2":  # GPT-2's derived shape: TrainConfig takes it as "derived" (0)
        fixed.update(n_kv_head=0, head_dim=0)
    if "block_size" not in explicit:
        fixed["block_size"] = g.block_size
    elif explicit["block_size"] > g.block_size:
        raise UserError(f"{explicit['block_size']} exceeds the context ({g.block_size}) of {folder}",
                        flag="--block-size")
    return fixed
