"""Prefix caching: prompts that share a beginning reuse its KV instead of computing it again.

Hash-chained blocks, as vLLM does it: a prompt is cut into blocks of ``block_size`` tokens and
block i is known by a key over (block i-1's key, block i's tokens), so a key names a whole prefix,
not just one block's tokens. A block's K/V lives in a fixed pool of host memory (its size is a
flag, so memory stays bounded); when the pool is full the least recently used block is evicted.
Lookups check the stored tokens too, so a hash collision can never serve another prompt's KV.

The engine copies matching blocks into a request's cache slot before its first prefill chunk
(a few memcpys: far cheaper than recomputing them) and stores a sequence's full blocks when its
prompt is done and again when it finishes (so a chat's next turn, which starts with this turn's
prompt and answer, finds both). The last prompt token is always computed: its logits give the
first generated token.

This module knows nothing about requests or scheduling; ``Runner.read_kv`` / ``write_kv`` move
the bytes.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from nextoken.export.runtime import Runner


@dataclass
class PrefixStats:
    queried_tokens: int = 0  # prompt tokens looked up
    hit_tokens: int = 0  # of which served from the cache
    evictions: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


class PrefixCache:
    def __init__(self, runner: Runner, *, block_size: int, max_bytes: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.runner = runner
        self.block_size = block_size
        self.buffers = 2 * runner.n_layer
        block_bytes = self.buffers * runner.n_kv_head * block_size * runner.head_dim * runner.spec.itemsize
        self.num_blocks = max_bytes // block_bytes
        if self.num_blocks < 1:
            raise ValueError(f"a prefix cache of {max_bytes} bytes holds no block of {block_bytes} bytes")
        # (num_blocks, n_layer * 2, nh, block_size, hs); np.empty commits memory only as blocks are written
        self.pool = np.empty((self.num_blocks, self.buffers, runner.n_kv_head, block_size, runner.head_dim),
                             dtype=runner.kv_dtype)
        self.nbytes = self.pool.nbytes
        self._index: OrderedDict[int, int] = OrderedDict()  # key -> pool block, least recently used first
        self._tokens: dict[int, tuple[int, ...]] = {}  # key -> the block's tokens (checked on every hit)
        self._free = list(range(self.num_blocks))
        self.stats = PrefixStats()

    def _chain(self, ids: list[int], n_blocks: int) -> list[tuple[int, tuple[int, ...]]]:
        """(key, tokens) of the first ``n_blocks`` blocks of ``ids``."""
        out, key, B = [], 0, self.block_size
        for i in range(n_blocks):
            tokens = tuple(ids[i * B:(i + 1) * B])
            key = hash((key, tokens))
            out.append((key, tokens))
        return out

    def match(self, prompt_ids: list[int]) -> tuple[int, list[int]]:
        """Leading prompt tokens whose KV is cached (whole blocks, never the last token), and their keys."""
        n_blocks = (len(prompt_ids) - 1) // self.block_size
        self.stats.queried_tokens += len(prompt_ids)
        keys = []
        for key, tokens in self._chain(prompt_ids, n_blocks):
            if key not in self._index or self._tokens[key] != tokens:
                break
            keys.append(key)
        for key in keys:
            self._index.move_to_end(key)
        self.stats.hit_tokens += len(keys) * self.block_size
        return len(keys) * self.block_size, keys

    def load(self, keys: list[int], slot: int) -> None:
        """Copy the blocks ``keys`` (a chain from the prompt's start) into ``slot`` at positions 0...."""
        for i, key in enumerate(keys):
            self.runner.write_kv(slot, i * self.block_size, self.pool[self._index[key]])

    def store(self, ids: list[int], num_tokens: int, slot: int) -> int:
        """Keep the full blocks among the first ``num_tokens`` of ``ids``, whose KV is in ``slot``.

        Returns the tokens newly written (blocks already held are only marked as recently used).
        """
        chain = self._chain(ids, num_tokens // self.block_size)
        keep = {key for key, _ in chain}
        written = 0
        for i, (key, tokens) in enumerate(chain):
            if key in self._index:
                self._index.move_to_end(key)
                continue
            block = self._allocate(keep)
            if block is None:  # the pool is smaller than this prompt: keep what fits
                break
            start = i * self.block_size
            self.runner.read_kv(slot, start, start + self.block_size, out=self.pool[block])
            self._index[key] = block
            self._tokens[key] = tokens
            written += self.block_size
        return written

    def _allocate(self, protected: set[int]) -> int | None:
        if self._free:
            return self._free.pop()
        for key in self._index:  # least recently used first
            if key not in protected:
                block = self._index.pop(key)
                del self._tokens[key]
                self.stats.evictions += 1
                return block
        return None

    @property
    def blocks_used(self) -> int:
        return len(self._index)
