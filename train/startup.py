"""Where a run starts, and what it trains with: the checkpoint, the tokenizer, the corpus, the architecture.

Four starts: a new run (a folder that already holds checkpoints is refused); the run in
``--out-dir`` continued (``--resume auto``, or one of its own checkpoints: its saved tokenizer,
tokenized corpus and architecture, as ``settings.resumed_settings`` kept its settings); another
run's checkpoint (``--resume PATH``: its weights, this run's data, as ``nextoken retrain`` does);
or an ``--init-from`` Hugging Face folder (its architecture, tokenizer and weights). The settings
were settled before (``settings``); this module finds files, tokenizes, and writes ``config.json``.
Nothing here trains.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nextoken.errors import UserError
from nextoken.fileio import atomic_write_text
from nextoken.train import distributed as D
from nextoken.train.checkpoint import find_resume_checkpoint, list_checkpoints, verify_checkpoint
from nextoken.train.config import GPTConfig, TrainConfig
from nextoken.train.data import TokenData, iter_documents, tokenize_corpus
from nextoken.train.settings import resumes_own_run
from nextoken.train.sources import resolve_sources
from nextoken.train.tokenizer import (
    document_token_id,
    load_tokenizer,
    special_token_ids,
    tokenizer_kind,
    train_tokenizer,
)

if TYPE_CHECKING:
    from nextoken.train.hf_import import HFModel


@dataclass
class Start:
    resume_path: Path | None  # the checkpoint folder whose weights, optimizer and RNGs the run continues
    saved_config: dict[str, Any] | None  # config.json of the run in --out-dir, when continuing that run
    init: HFModel | None  # an --init-from folder: architecture, tokenizer and starting weights


def find_start(cfg: TrainConfig, run_dir: Path, say: Callable[[str], None]) -> Start:
    """What the run continues from, checked before any data is read."""
    ckpt_root = run_dir / "checkpoints"
    resume_path = None
    if cfg.resume == "auto":
        found = find_resume_checkpoint(ckpt_root, warn=say)
        resume_path = found.path if found is not None else None
    elif cfg.resume != "never":
        resume_path = Path(cfg.resume)
        verify_checkpoint(resume_path)
    elif list_checkpoints(ckpt_root):
        raise UserError(f"{run_dir} already holds checkpoints; pass --resume auto to continue it, or choose a new "
                        "--out-dir", flag="--out-dir")
    # Continuing the run in this folder (cfg holds its saved settings: train.settings.resumed_settings):
    # its tokenizer, tokenized corpus and architecture as saved; config.json is rewritten only after
    # the checkpoint has loaded, and only if a setting a resume may change did change.
    saved_config = json.loads((run_dir / "config.json").read_text()) if resumes_own_run(cfg.resume, run_dir) else None
    init = None
    if cfg.init_from and saved_config is None:  # the folder's architecture, tokenizer and weights
        from nextoken.train.hf_import import init_from_hf  # PyTorch and safetensors: only for --init-from

        init = init_from_hf(cfg.init_from, dropout=cfg.dropout, block_size=cfg.block_size)
        say(f"starting from {cfg.init_from} ({init.model_type}): {init.config.n_layer} layers, "
            f"{init.config.n_embd} wide, context {init.config.block_size}")
    return Start(resume_path, saved_config, init)


def prepare_tokenizer_and_data(cfg: TrainConfig, run_dir: Path, info: D.DistInfo, start: Start,
                               say: Callable[[str], None], quiet: bool = False) -> tuple[Any, TokenData]:
    """The run's tokenizer (kept when resuming, the --init-from folder's, else trained) and its tokenized corpus.

    Continuing the run in ``run_dir``, its tokenizer and tokenized corpus are read as they are
    (the sources are not read again, nothing is rewritten).
    """
    tok_path = run_dir / "tokenizer.json"
    if start.saved_config is not None and tok_path.is_file() and (run_dir / "data" / "manifest.json").is_file():
        D.barrier(info)
        data = TokenData(run_dir / "data")
        data.check_block_size(cfg.block_size)
        return load_tokenizer(tok_path), data
    files = resolve_sources(cfg.data)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if start.resume_path is not None and tok_path.is_file():
            tok = load_tokenizer(tok_path)
        elif start.init is not None:
            tok = start.init.tokenizer
            atomic_write_text(tok_path, tok.to_str(pretty=True))
            # its chat template, special tokens and generation defaults go with it (and into every export)
            start.init.files.save(run_dir)
        elif cfg.tokenizer_from:  # another model's tokenizer as it is (a draft for speculative decoding)
            from nextoken.train.hf_tokens import TokenizerFiles, read_tokenizer

            tok = read_tokenizer(Path(cfg.tokenizer_from), "--tokenizer-from")
            atomic_write_text(tok_path, tok.to_str(pretty=True))
            special = TokenizerFiles.load(Path(cfg.tokenizer_from))
            if special is not None:  # its special tokens, chat template and end ids, as an export wrote them
                special.save(run_dir)
            say(f"tokenizer: {cfg.tokenizer_from}'s ({tokenizer_kind(tok)}, {tok.get_vocab_size()} tokens)")
        else:
            source = "the built-in corpus (Python standard library)" if not cfg.data else f"{len(files)} file(s)"
            say(f"training a {cfg.tokenizer} tokenizer on {source}")
            tok = train_tokenizer(cfg.tokenizer, iter_documents(files, cfg.text_field, cfg.max_corpus_chars),
                                  cfg.vocab_size)
            atomic_write_text(tok_path, tok.to_str(pretty=True))
        manifest = tokenize_corpus(files, tok, run_dir / "data", text_field=cfg.text_field,
                                   max_chars=cfg.max_corpus_chars, val_fraction=cfg.val_fraction,
                                   progress=cfg.progress and not quiet, eot_id=document_token_id(tok, run_dir))
        say(f"corpus: {manifest.num_documents} documents, {manifest.num_chars:,} characters, "
            f"{manifest.num_tokens:,} tokens (vocab {tok.get_vocab_size()}); "
            f"{manifest.split:,} train / {manifest.num_tokens - manifest.split:,} val")
    D.barrier(info)
    tok = load_tokenizer(tok_path)
    data = TokenData(run_dir / "data")
    data.check_block_size(cfg.block_size)
    return tok, data


def settle_model(cfg: TrainConfig, run_dir: Path, tok: Any, start: Start,
                 info: D.DistInfo) -> tuple[GPTConfig, dict[str, Any]]:
    """The architecture and the run's config.json contents; a new run's config.json is written here."""
    # An --init-from model keeps its own vocabulary size (a padded table stays padded) and context.
    if start.saved_config is not None:
        mcfg = GPTConfig.from_dict(start.saved_config["model"])
    else:
        mcfg = start.init.config if start.init else cfg.model_config(tok.get_vocab_size())
    run_config = {"model": mcfg.to_dict(), "train": cfg.to_dict(),
                  "tokenizer": {"kind": tokenizer_kind(tok), "vocab_size": tok.get_vocab_size(),
                                **special_token_ids(tok, run_dir)}}
    if info.is_main and start.saved_config is None:
        atomic_write_text(run_dir / "config.json", json.dumps(run_config, indent=2))
    return mcfg, run_config


def record_resumed_settings(run_dir: Path, saved_config: dict[str, Any], run_config: dict[str, Any]) -> None:
    """Once the checkpoint has loaded, record what a resume changed (a longer budget, another cadence).

    Where the run lives and how this invocation resumed it describe the command, not the run.
    """
    kept = {k: saved_config["train"][k] for k in ("out_dir", "resume") if k in saved_config["train"]}
    if dict(run_config["train"], **kept) != saved_config["train"]:
        saved_config["train"] = dict(run_config["train"], **kept)
        atomic_write_text(run_dir / "config.json", json.dumps(saved_config, indent=2))
