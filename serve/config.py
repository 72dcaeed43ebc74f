"""``ServeConfig``: every default and tuning knob of the server in one dataclass; the CLI is built from it.

Each field's metadata holds its flag help (and choices); ``add_arguments`` turns the fields into
``nextoken serve`` flags (``max_batch_size`` -> ``--max-batch-size``) and ``from_args`` reads
them back, so a knob exists in exactly one place. ``validate`` checks what argparse cannot and
names the flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from nextoken.errors import UserError


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class ServeConfig:
    artifact_dir: str = field(default="", metadata={"positional": "ARTIFACT_DIR", "help": (
        "artifact folder written by `nextoken export`, or a models folder's `current` pointer "
        "(new versions published there are loaded without dropping requests); `nextoken serve` also takes a "
        "Hugging Face model folder, exported once into $NEXTOKEN_CACHE")})
    # network
    host: str = _opt("127.0.0.1", "address to bind (0.0.0.0 for all interfaces)",
                     choices=("127.0.0.1", "0.0.0.0", "::"))
    port: int = _opt(8000, "TCP port (1024-65535)")
    api_key_env: str | None = _opt(None, "environment variable holding the API key; every route but the probes "
                                         "and the playground's static files then needs it", metavar="NAME")
    # capacity
    max_batch_size: int = _opt(32, "sequences decoded together: the KV cache holds this many slots")
    max_queue: int = _opt(256, "requests waiting for a slot beyond the batch (more get 429 at once)")
    max_model_len: int = _opt(0, "longest sequence (prompt + output) the cache holds per slot; 0 = the model's "
                                 "context (or what --kv-cache-mb leaves per slot). Cache memory = slots x this x "
                                 "layers x 2 x width x 4 bytes")
    kv_cache_mb: float = _opt(0.0, "bound on the KV cache, allocated at start-up: it then holds MiB / (bytes per "
                                   "token) tokens, as --max-batch-size slots of up to the context, or as many "
                                   "slots of --max-model-len as fit; 0 = --max-batch-size x --max-model-len. A "
                                   "configuration that does not fit the free memory is refused before loading")
    max_num_batched_tokens: int = _opt(0, "tokens one engine step may process: one per decoding row, the rest for "
                                          "prompt chunks. 0 = sized to the model: prompts may add 2 x decoding rows "
                                          "+ a call's fixed cost in tokens (measured at start-up) while rows decode, "
                                          "a whole burst when none does")
    prefix_cache_mb: float | None = _opt(None, "host memory for cached prompt prefixes (0 turns prefix caching off; "
                                                "default: 64 on cpu, 0 on cuda, where it is not built yet)")
    prefix_block_size: int = _opt(16, "tokens per prefix-cache block")
    # compute
    chat_template: str | None = _opt(None, "a Jinja chat template (a file, or the template itself) used instead of "
                                           "the model's own (vLLM's flag)")
    generation_config: str = _opt("auto", "auto: the model's generation_config.json sets the defaults of the "
                                          "sampling fields a request omits (vLLM's default); vllm: ignore it",
                                  choices=("auto", "vllm"))
    device: str = _opt("cpu", "where ONNX Runtime runs the model", choices=("cpu", "cuda"))
    threads: int = _opt(0, "ONNX Runtime intra-op threads (0 = every physical core up to 4, one fewer from 5, "
                           "one for a model under 32 MiB on up to 2 cores; hyperthreads count once, a container's "
                           "CPU quota caps it). On a machine other jobs share, --threads 1 is steadier")
    # speculative decoding (serve/engine/spec.py)
    speculative: str = _opt("none", "speculative decoding: guess a request's next tokens and let the model check them "
                                    "all in one call; ngram guesses from the request's own prompt and output (prompt "
                                    "lookup), draft with a small model (--draft-model). Greedy output is the same "
                                    "token for token, sampled output has the same distribution",
                            choices=("none", "ngram", "draft"))
    num_speculative_tokens: int = _opt(4, "tokens one draft proposes at most (with --speculative)")
    prompt_lookup_max: int = _opt(4, "longest run of last tokens the lookup matches (--speculative ngram)")
    prompt_lookup_min: int = _opt(2, "shortest run of last tokens the lookup matches (--speculative ngram)")
    draft_model: str | None = _opt(None, "the draft model for --speculative draft: an artifact folder with the served "
                                         "model's tokenizer (`nextoken train --tokenizer-from ARTIFACT_DIR` makes one)",
                                   metavar="ARTIFACT")
    speculative_disable_by_batch_size: int = _opt(
        1, "no request drafts while more than this many run or wait (vLLM's disable_by_batch_size). ONNX Runtime "
           "verifies each drafting row in a call of its own (its attention batches multi-token rows only without "
           "a past), so at several streams n verification calls replace one batched decode call: raise it for a "
           "model whose calls cost little beside their tokens")
    # lifecycle
    drain_timeout: float = _opt(30.0, "seconds in-flight requests may take to finish after SIGTERM/SIGINT")
    reload_poll_s: float = _opt(1.0, "how often the engine looks for a new model version")
    # transport and limits
    max_body_bytes: int = _opt(1 << 20, "largest request body accepted (413 above)")
    message_rate: float = _opt(1000.0, "engine -> HTTP messages per second at most (tokens produced meanwhile "
                                       "travel together; a first or last token never waits)")
    engine_check_s: float = _opt(0.5, "how often a waiting request checks that the engine process is alive",
                                 aliases=("--worker-check-s",))  # its old name, kept for existing command lines
    metrics_compat: str | None = _opt(None, "also expose queue and cache gauges under another engine's names "
                                            "(vllm: what Gateway API inference extensions scrape)",
                                      choices=("vllm",))
    log_level: str = _opt("warning", "log level", choices=("debug", "info", "warning", "error"))

    def __post_init__(self) -> None:
        if self.prefix_cache_mb is None:  # the default follows the device: prefix caching is CPU-only for now
            self.prefix_cache_mb = 0.0 if self.device == "cuda" else 64.0

    @property
    def max_inflight(self) -> int:
        return self.max_batch_size + self.max_queue

    @property
    def prefix_cache_bytes(self) -> int:
        return int(self.prefix_cache_mb * (1 << 20))

    def validate(self) -> ServeConfig:
        def need(ok: bool, flag: str, msg: str) -> None:
            if not ok:
                raise UserError(msg, flag=flag)

        need(1024 <= self.port <= 65535, "--port", f"must be in 1024..65535, got {self.port}")
        need(self.max_batch_size >= 1, "--max-batch-size", f"must be >= 1, got {self.max_batch_size}")
        need(self.max_queue >= 0, "--max-queue", f"must be >= 0, got {self.max_queue}")
        need(self.max_model_len >= 0, "--max-model-len", f"must be >= 0, got {self.max_model_len}")
        need(self.max_num_batched_tokens == 0 or self.max_num_batched_tokens >= self.max_batch_size,
             "--max-num-batched-tokens", f"must be 0 (sized to the model) or >= --max-batch-size "
             f"({self.max_batch_size}): every decoding row needs a token of it each step; got "
             f"{self.max_num_batched_tokens}")
        need(self.kv_cache_mb >= 0, "--kv-cache-mb", f"must be >= 0, got {self.kv_cache_mb}")
        need(self.prefix_cache_mb >= 0, "--prefix-cache-mb", f"must be >= 0, got {self.prefix_cache_mb}")
        need(self.prefix_block_size >= 1, "--prefix-block-size", f"must be >= 1, got {self.prefix_block_size}")
        need(not (self.device == "cuda" and self.prefix_cache_mb > 0), "--prefix-cache-mb",
             "prefix caching copies KV through host memory and is CPU-only for now; leave --prefix-cache-mb out "
             "(or 0) with --device cuda")
        need(self.threads >= 0, "--threads", f"must be >= 0, got {self.threads}")
        self._validate_speculative(need)
        need(self.drain_timeout >= 0, "--drain-timeout", f"must be >= 0, got {self.drain_timeout}")
        need(self.reload_poll_s > 0, "--reload-poll-s", f"must be > 0, got {self.reload_poll_s}")
        need(self.max_body_bytes >= 1024, "--max-body-bytes", f"must be >= 1024, got {self.max_body_bytes}")
        need(self.message_rate > 0, "--message-rate", f"must be > 0, got {self.message_rate}")
        need(self.engine_check_s > 0, "--engine-check-s", f"must be > 0, got {self.engine_check_s}")
        if self.api_key_env:
            need(bool(os.environ.get(self.api_key_env)), "--api-key-env",
                 f"environment variable {self.api_key_env} is not set or empty")
        return self


    _SPEC_FIELDS = ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min", "draft_model",
                    "speculative_disable_by_batch_size")
    _NGRAM_FIELDS = ("prompt_lookup_max", "prompt_lookup_min")

    def _validate_speculative(self, need: Any) -> None:
        if self.speculative == "none":  # a speculative knob without speculation would be a flag that does nothing
            for f in dataclasses.fields(self):
                if f.name in self._SPEC_FIELDS and getattr(self, f.name) != f.default:
                    need(False, _flag(f.name), "needs --speculative ngram or draft (speculative decoding is off)")
            return
        for f in dataclasses.fields(self):  # each method's own knobs, refused with the other
            if f.name in self._NGRAM_FIELDS and self.speculative != "ngram" and getattr(self, f.name) != f.default:
                need(False, _flag(f.name), "applies to --speculative ngram only")
        need((self.speculative == "draft") == bool(self.draft_model), "--draft-model",
             "names the draft model of --speculative draft, and only of it" if self.draft_model else
             "--speculative draft needs a draft model: --draft-model ARTIFACT")
        need(1 <= self.num_speculative_tokens <= 32, "--num-speculative-tokens",
             f"must be in 1..32, got {self.num_speculative_tokens}")
        need(self.prompt_lookup_min >= 1, "--prompt-lookup-min", f"must be >= 1, got {self.prompt_lookup_min}")
        need(self.prompt_lookup_max >= self.prompt_lookup_min, "--prompt-lookup-max",
             f"must be >= --prompt-lookup-min ({self.prompt_lookup_min}), got {self.prompt_lookup_max}")
        need(self.speculative_disable_by_batch_size >= 1, "--speculative-disable-by-batch-size",
             f"must be >= 1, got {self.speculative_disable_by_batch_size}")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, *, skip: tuple[str, ...] = ()) -> None:
    """One flag per ServeConfig field (its default and help from the field); ``skip`` leaves some out."""
    for f in dataclasses.fields(ServeConfig):
        if f.name in skip:
            continue
        meta = f.metadata
        if "positional" in meta:
            parser.add_argument(f.name, metavar=meta["positional"], help=meta["help"])
            continue
        kind = {"int": int, "float": float}.get(str(f.type).replace(" | None", ""), str)
        help_ = meta["help"] if f.default is None else f"{meta['help']} (default: {f.default})"
        kwargs: dict[str, Any] = {"default": f.default, "help": help_}
        if "choices" in meta:
            kwargs["choices"] = meta["choices"]
        if "metavar" in meta:
            kwargs["metavar"] = meta["metavar"]
        aliases = meta.get("aliases", ())
        if aliases:
            kwargs["help"] += f"; {', '.join(aliases)} is the deprecated name"
        parser.add_argument(_flag(f.name), *aliases, type=kind, dest=f.name, **kwargs)


def from_args(args: argparse.Namespace, **overrides: Any) -> ServeConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServeConfig) if hasattr(args, f.name)}
    values.update(overrides)
    return ServeConfig(**values)
