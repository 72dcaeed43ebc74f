"""What every exporter starts from: a run folder's checkpoint or a Hugging Face model folder, loaded and described.

Shared by the ONNX, Hugging Face and GGUF exporters and ``nextoken eval`` so each names the same
flags in the same words when a folder or checkpoint is wrong. ``load_source`` tells the two apart
by ``config.json``: a run's holds ``{"model", "train", "tokenizer"}``, a Hugging Face folder's a
``model_type`` (gpt2, llama, qwen2, mistral; ``nextoken.train.hf_import`` reads it). It reads;
it writes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from nextoken.errors import UserError
from nextoken.export.cache import is_hf_folder
from nextoken.fileio import read_json_object, read_jsonl
from nextoken.train.checkpoint import CheckpointInfo, load_weights
from nextoken.train.config import GPTConfig
from nextoken.train.hf_tokens import TokenizerFiles
from nextoken.train.model import GPT
from nextoken.train.run import pick_checkpoint, read_run_config
from nextoken.train.tokenizer import document_token_id, load_tokenizer, special_token_ids, tokenizer_kind


def family_model_type(config: GPTConfig) -> str:
    """The Hugging Face ``model_type`` that computes ``config``: gpt2, or llama (qwen2 with q/k/v biases)."""
    if config.arch == "gpt2":
        return "gpt2"
    return "qwen2" if config.qkv_bias else "llama"


@dataclass
class RunSource:
    run_dir: Path  # the run folder, or the Hugging Face folder
    run_config: dict[str, Any]  # the run's config.json: {"model", "train", "tokenizer"}; {} for a Hugging Face folder
    config: GPTConfig
    model: GPT  # fp32, CPU, eval mode
    tokenizer: Tokenizer
    tokenizer_kind: str
    eos_token_id: int  # ends generation (the first of eos_token_ids)
    unk_token_id: int | None
    checkpoint: CheckpointInfo | None  # None for a Hugging Face folder
    meta: dict[str, Any]  # the checkpoint's meta.json ({} for a Hugging Face folder)
    # The tokenizer's chat template, special tokens and generation defaults when they are a Hugging Face
    # folder's (the folder's own, or those a run started --init-from one kept); None: our own tokenizer.
    files: TokenizerFiles | None = None
    model_type: str = "gpt2"  # the Hugging Face model_type that computes it (a folder's own: mistral stays mistral)

    @property
    def is_hf(self) -> bool:
        return self.checkpoint is None

    @property
    def eos_token_ids(self) -> list[int]:
        """Every id that ends generation (a Hugging Face folder may name several)."""
        return list(self.files.eos_token_ids) if self.files and self.files.eos_token_ids else [self.eos_token_id]

    def config_json(self, name: str, version: str, dtype: str = "float32") -> dict[str, Any]:
        """config.json (``artifact.artifact_config``), with a Hugging Face folder's token ids as it had them."""
        from nextoken.export.artifact import artifact_config

        gen = self.files.generation_config if self.files is not None else {}
        eos = gen.get("eos_token_id", self.eos_token_id) if self.files is not None else self.eos_token_id
        bos, pad = (gen.get("bos_token_id"), gen.get("pad_token_id")) if self.files else (eos, eos)
        config = artifact_config(self.config.to_dict(), model_type=self.model_type, eos_token_id=eos,
                                 bos_token_id=bos, pad_token_id=pad, unk_token_id=self.unk_token_id, name=name,
                                 version=version, tokenizer_kind=self.tokenizer_kind, dtype=dtype,
                                 non_family={k: getattr(self.config, k) for k in self.config.non_gpt2_options()})
        # What a text prompt starts after: the document separator of a model nextoken trained (its training
        # documents followed it); nothing for a folder's own model, whose tokenizer adds what it learned (a BOS).
        config["prompt_prefix_id"] = None if self.is_hf else self.eos_token_id
        return config

    def generation_config(self) -> dict[str, Any]:
        """generation_config.json: a Hugging Face folder's own, else ours (``nextoken generate``'s defaults)."""
        from nextoken.export.ecosystem import generation_config

        if self.files is not None and self.files.generation_config:
            return dict(self.files.generation_config)
        return generation_config(block_size=self.config.block_size, eos_token_id=self.eos_token_id)

    def describe(self) -> str:
        if self.checkpoint is None:
            return f"Hugging Face folder {self.run_dir} ({self.model_type})"
        return f"{self.run_dir} step {self.checkpoint.step}"

    def record(self) -> dict[str, Any]:
        """Where the export came from, for manifest.json."""
        if self.checkpoint is None:
            return {"hf_folder": str(self.run_dir.resolve()), "model_type": self.model_type}
        return {"run": str(self.run_dir.resolve()), "checkpoint": self.checkpoint.path.name,
                "step": self.checkpoint.step, "val_loss": self.meta.get("val_loss"),
                "weights_sha256": self.meta.get("files", {}).get("model.safetensors")}

    @property
    def summary(self) -> dict[str, Any]:
        """summary.json of a finished run, {} while it trains or when absent."""
        return read_json_object(self.run_dir / "summary.json") or {}

    def eval_history(self) -> list[dict[str, Any]]:
        """The run's evaluation records (step, train_loss, val_loss, ...) from metrics.jsonl."""
        return [rec for rec in read_jsonl(self.run_dir / "metrics.jsonl") if rec.get("event") == "eval"]


def name_and_version(run_dir: Path, name: str | None, version: str | None) -> tuple[str, str]:
    """What an export records as the model's name (default: the folder's) and version (default: 1)."""
    return name or run_dir.resolve().name, str(version) if version is not None else "1"


def refuse_inexpressible(config: GPTConfig, fmt: str) -> None:
    """The format's loaders would misread a model with options they lack: say which."""
    options = config.non_gpt2_options()
    if options:
        family = "GPT-2's" if config.arch == "gpt2" else "the Llama family's"
        raise UserError(f"--format {fmt} writes {family} architecture, and this model sets {', '.join(options)} "
                        f"away from it; those loaders would compute something else. Use --format onnx "
                        f"(our runtime and ONNX Runtime run it as trained)", flag="--format")


refuse_non_gpt2 = refuse_inexpressible  # the name the GPT-2-only exporters used


def load_hf_source(folder: Path, *, fmt: str | None = None) -> RunSource:
    """A Hugging Face folder as an export source: its weights in our model (fp32), its tokenizer files."""
    from nextoken.train.hf_import import load_hf, read_hf_config

    if fmt is not None:
        refuse_inexpressible(read_hf_config(folder, flag="HF_DIR"), fmt)
    hf = load_hf(folder, flag="HF_DIR")
    model = GPT.from_state_dict(hf.config, hf.state_dict).float().eval()
    return RunSource(folder, {}, hf.config, model, hf.tokenizer, tokenizer_kind(hf.tokenizer), hf.eos_token_id,
                     special_token_ids(hf.tokenizer)["unk_token_id"], None, {}, hf.files, hf.model_type)


def load_source(run_dir: str | Path, checkpoint: str = "best", *, gpt2_format: str | None = None) -> RunSource:
    """Load ``run_dir``'s checkpoint (``best``, ``latest``, a step or a folder), or a Hugging Face folder, in fp32.

    With ``gpt2_format`` (``"hf"``, ``"gguf"``: a format whose loaders know only the family's own
    architecture), refuse before reading weights when the model sets options they lack.
    """
    run_dir = Path(run_dir)
    if is_hf_folder(run_dir):
        if checkpoint not in ("best", "latest"):
            raise UserError(f"{run_dir} is a Hugging Face folder: it has one set of weights, no checkpoints",
                            flag="--checkpoint")
        return load_hf_source(run_dir, fmt=gpt2_format)
    cfg = read_run_config(run_dir)
    gpt_cfg = GPTConfig.from_dict(cfg["model"])
    if gpt2_format is not None:
        refuse_inexpressible(gpt_cfg, gpt2_format)
    tok = load_tokenizer(run_dir / "tokenizer.json")
    try:
        ckpt = pick_checkpoint(run_dir, checkpoint)
    except ValueError as e:  # a checkpoint folder whose meta.json is not JSON
        raise UserError(f"{checkpoint} is not a readable checkpoint: {e}", flag="--checkpoint") from None
    model = GPT(gpt_cfg)
    meta = load_weights(ckpt.path, model, flag="--checkpoint")
    model.float().eval()
    eos = document_token_id(tok, run_dir)
    if eos is None:
        raise UserError(f"{run_dir}/tokenizer.json has no <|endoftext|> token", flag="RUN")
    files = TokenizerFiles.load(run_dir)  # a run started --init-from a Hugging Face folder kept its files
    return RunSource(run_dir, cfg, gpt_cfg, model, tok, tokenizer_kind(tok), eos,
                     special_token_ids(tok)["unk_token_id"], ckpt, meta, files, family_model_type(gpt_cfg))
