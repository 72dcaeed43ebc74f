"""What every exporter starts from: a run folder's checkpoint, loaded and described.

Shared by the ONNX, Hugging Face and GGUF exporters and ``nextoken eval`` so each names the same
flags in the same words when a run folder or checkpoint is wrong. It reads; it writes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from nextoken.errors import UserError
from nextoken.fileio import read_json_object, read_jsonl
from nextoken.train.checkpoint import CheckpointInfo, load_weights
from nextoken.train.config import GPTConfig
from nextoken.train.model import GPT
from nextoken.train.run import pick_checkpoint, read_run_config
from nextoken.train.tokenizer import load_tokenizer, special_token_ids, tokenizer_kind


@dataclass
class RunSource:
    run_dir: Path
    run_config: dict[str, Any]  # the run's config.json: {"model", "train", "tokenizer"}
    config: GPTConfig
    model: GPT  # fp32, CPU, eval mode
    tokenizer: Tokenizer
    tokenizer_kind: str
    eos_token_id: int
    unk_token_id: int | None
    checkpoint: CheckpointInfo
    meta: dict[str, Any]  # the checkpoint's meta.json

    @property
    def summary(self) -> dict[str, Any]:
        """summary.json of a finished run, {} while it trains or when absent."""
        return read_json_object(self.run_dir / "summary.json") or {}

    def eval_history(self) -> list[dict[str, Any]]:
        """The run's evaluation records (step, train_loss, val_loss, ...) from metrics.jsonl."""
        return [rec for rec in read_jsonl(self.run_dir / "metrics.jsonl") if rec.get("event") == "eval"]


def name_and_version(run_dir: Path, name: str | None, version: str | None) -> tuple[str, str]:
    """What an export records as the model's name (default: the run folder's) and version (default: 1)."""
    return name or run_dir.resolve().name, str(version) if version is not None else "1"


def refuse_non_gpt2(config: GPTConfig, fmt: str) -> None:
    """A GPT-2 loader would misread a model whose architecture differs from GPT-2's: say which options."""
    options = config.non_gpt2_options()
    if options:
        raise UserError(f"--format {fmt} writes GPT-2's architecture, and this model sets {', '.join(options)} "
                        f"away from GPT-2's; GPT-2 loaders would compute something else. Use --format onnx "
                        f"(our runtime and ONNX Runtime run it as trained)", flag="--format")


def load_source(run_dir: str | Path, checkpoint: str = "best", *, gpt2_format: str | None = None) -> RunSource:
    """Load ``run_dir``'s checkpoint (``best``, ``latest``, a step or a folder) on the CPU in fp32.

    With ``gpt2_format`` (``"hf"``, ``"gguf"``), refuse before reading weights when the
    architecture is not GPT-2's.
    """
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    gpt_cfg = GPTConfig.from_dict(cfg["model"])
    if gpt2_format is not None:
        refuse_non_gpt2(gpt_cfg, gpt2_format)
    tok = load_tokenizer(run_dir / "tokenizer.json")
    try:
        ckpt = pick_checkpoint(run_dir, checkpoint)
    except ValueError as e:  # a checkpoint folder whose meta.json is not JSON
        raise UserError(f"{checkpoint} is not a readable checkpoint: {e}", flag="--checkpoint") from None
    model = GPT(gpt_cfg)
    meta = load_weights(ckpt.path, model, flag="--checkpoint")
    model.float().eval()
    special = special_token_ids(tok)
    if special["eos_token_id"] is None:
        raise UserError(f"{run_dir}/tokenizer.json has no <|endoftext|> token", flag="RUN")
    return RunSource(run_dir, cfg, gpt_cfg, model, tok, tokenizer_kind(tok), special["eos_token_id"],
                     special["unk_token_id"], ckpt, meta)
