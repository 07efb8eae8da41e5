"""KV block bookkeeping with prefix caching. No torch: block ids index the model runner's KV pool.

A full block is named by a chained hash of (parent block's hash, adapter id, its token ids), so two
sequences with the same prefix (and adapter) map it to one physical block. Blocks whose reference count
drops to zero stay findable by hash until a new allocation evicts them, least recently freed first.
"""

from collections import OrderedDict
from dataclasses import dataclass

from lmforge.engine.sequence import Sequence


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set once the block is full and computed


def chained_hash(parent: int | None, adapter_id: int, tokens: tuple[int, ...]) -> int:
    return hash((parent, adapter_id, tokens))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # evict from the front
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.prefix_queries = 0  # prompt tokens looked up
        self.prefix_hits = 0  # of which found in the cache

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free_blocks) / len(self.blocks)

    @property
    def hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _hashes(self, seq: Sequence, num_full: int) -> list[int]:
        """The chained hashes of seq's first num_full blocks, extending the ones it already has."""
        size = self.block_size
        for i in range(len(seq.block_hashes), num_full):
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            seq.block_hashes.append(chained_hash(parent, seq.adapter_id, tuple(seq.token_ids[i * size:(i + 1) * size])))
        return seq.block_hashes[:num_full]

    def allocate_cached_prefix(self, seq: Sequence) -> int:
        """Gives a sequence with no blocks the cached blocks of its longest cached prefix; returns the tokens
        covered. At least one token is always left to compute, since the model must produce the next logits."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        if not self.enable_prefix_caching or seq.needs_prompt_logprobs:  # a cached position would not be scored
            return 0
        hits = 0
        for h in self._hashes(seq, (seq.num_tokens - 1) // self.block_size):
            block_id = self.cached.get(h)
            if block_id is None:
                break
            self._take(block_id)
            seq.block_table.append(block_id)
            hits += 1
        tokens = hits * self.block_size
        self.prefix_queries += seq.num_tokens
        self.prefix_hits += tokens
        seq.num_computed_tokens = tokens
        return tokens

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_blocks[block_id]
        block.ref_count += 1

    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Grows seq's block table to hold num_computed_tokens + num_new_tokens; False (and nothing taken)
        when the free blocks do not suffice."""
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if need > len(self.free_blocks):
            return False
        for _ in range(need):
            block_id, _ = self.free_blocks.popitem(last=False)
            block = self.blocks[block_id]
            if block.hash is not None:  # evict: its contents are about to be overwritten
                if self.cached.get(block.hash) == block_id:
                    del self.cached[block.hash]
                block.hash = None
            block.ref_count = 1
            seq.block_table.append(block_id)
        return True

    def cache_full_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """Publishes the hashes of seq's blocks that its first num_tokens fill, so other requests can share them.
        The scheduler calls it for the tokens of the step it hands out: every layer writes a step's keys and values
        before it attends, so a request admitted later in the same step may already read them."""
        if not self.enable_prefix_caching:
            return
        num_full = num_tokens // self.block_size
        for i, h in enumerate(self._hashes(seq, num_full)):
            block = self.blocks[seq.block_table[i]]
            if block.hash is None and h not in self.cached:
                block.hash = h
                self.cached[h] = block.block_id

    def uncache_uncomputed_blocks(self, seq: Sequence) -> None:
        """Withdraws the hashes of seq's blocks beyond its computed tokens: a step that failed never filled them."""
        for block_id in seq.block_table[seq.num_computed_tokens // self.block_size:]:
            block = self.blocks[block_id]
            if block.hash is not None and self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
            block.hash = None

    def free_tail(self, seq: Sequence, num_tokens: int) -> None:
        """Releases seq's blocks beyond those its first num_tokens need (they held rejected draft tokens only,
        so no hash names them and no other sequence shares them)."""
        keep = self.blocks_needed(num_tokens)
        for block_id in seq.block_table[keep:]:
            block = self.blocks[block_id]
            assert block.ref_count == 1 and block.hash is None, "a draft-only block is shared or hashed"
            block.ref_count = 0
            self.free_blocks[block_id] = None
            self.free_blocks.move_to_end(block_id, last=False)
        del seq.block_table[keep:]

    def free(self, seq: Sequence) -> None:
        """Releases seq's blocks; unhashed ones are reused first, hashed ones stay findable until evicted."""
        for block_id in reversed(seq.block_table):  # tail blocks are the least likely to be shared: evict them first
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_blocks[block_id] = None
                if block.hash is None:
                    self.free_blocks.move_to_end(block_id, last=False)
        seq.block_table = []

    def reset_prefix_cache(self) -> bool:
        """Forgets every cached block (after a weight update). Refused (False) while any block is in use."""
        if len(self.free_blocks) != len(self.blocks):
            return False
        for block in self.blocks:
            block.hash = None
        self.cached.clear()
        return True
