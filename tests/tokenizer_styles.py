"""Tiny tokenizers in the three styles hub models ship, trained here with ``tokenizers`` (nothing downloaded).

* ``byte_bpe``: byte-level BPE (GPT-2, SmolLM2): ``Ġ`` for a space, any byte encodable, no BOS.
* ``regex_bpe``: tiktoken-style (Llama-3, Qwen2): a regex split, then byte-level BPE; ``bos=True``
  adds ``<|begin_of_text|>`` in the post-processor as Llama-3 does (Qwen2 adds nothing).
* ``metaspace_bpe``: SentencePiece-style (Llama-2, TinyLlama, Mistral): ``▁`` for a space, a BPE with
  ``<0xHH>`` byte-fallback tokens for characters it never saw, ``<s>`` added by the post-processor.

Each returns the ``Tokenizer`` and its special tokens (names as tokenizer_config.json spells them).
"""

from __future__ import annotations

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello there! How are you today? I am fine, thank you.",
    "User: what is the capital of France?\nAssistant: Paris is the capital of France.",
    "Numbers like 12345 and 2024 appear in text, as do symbols: {} [] () <> = + - * /.",
    "Once upon a time there was a little model that learned to predict the next token.",
] * 20

# Llama-3's split pattern, as its tokenizer.json writes it (contractions, letters, 1-3 digits, the rest)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _train(tok: Tokenizer, vocab_size: int, specials: list[str], byte_level: bool) -> None:
    alphabet = pre_tokenizers.ByteLevel.alphabet() if byte_level else []
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)


def byte_bpe(vocab_size: int = 400) -> tuple[Tokenizer, dict[str, str]]:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    _train(tok, vocab_size, specials, byte_level=True)
    return tok, {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>"}


def regex_bpe(vocab_size: int = 400, bos: bool = True) -> tuple[Tokenizer, dict[str, str]]:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                "<|im_start|>", "<|im_end|>"]
    _train(tok, vocab_size, specials, byte_level=True)
    if bos:
        bos_id = tok.token_to_id("<|begin_of_text|>")
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
            special_tokens=[("<|begin_of_text|>", bos_id)])
        return tok, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    return tok, {"eos_token": "<|im_end|>"}


def metaspace_bpe(vocab_size: int = 400) -> tuple[Tokenizer, dict[str, str]]:
    """A Llama-2-style tokenizer: its byte tokens are ordinary vocabulary entries (ids 3..258), as there."""
    seed = Tokenizer(models.BPE(unk_token="<unk>"))
    seed.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    seed.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")
    _train(seed, vocab_size, ["<unk>", "<s>", "</s>"], byte_level=False)
    learned = seed.get_vocab()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece, _ in sorted(learned.items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    import json

    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m)
              for m in json.loads(seed.to_str())["model"]["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = seed.normalizer
    tok.pre_tokenizer = seed.pre_tokenizer
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return tok, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


STYLES = {"byte_bpe": byte_bpe, "regex_bpe": regex_bpe, "metaspace_bpe": metaspace_bpe}
