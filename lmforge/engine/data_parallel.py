"""Data-parallel replicas behind one server (vLLM's `--data-parallel-size`): N engines, each a whole model with its own
KV pool, scheduler and engine thread (AsyncEngine), in this process; a request goes to one of them.

Routing (`PrefixRouter`): a prompt goes to the replica that has already seen the longest run of its leading KV blocks
(so its prefix cache can serve them), when that replica has seen strictly more of them than any other and is not
much busier than the least busy one; otherwise to the least busy (fewest requests in flight). Blocks every replica has
seen (a chat template's first tokens) do not pull requests anywhere.

Each replica runs torch's thread count of the process that starts it (OMP_NUM_THREADS=1 with two replicas on two
cores); its kernels and step graphs release the GIL, so replicas compute at the same time. The offline `LLM` has no
data parallelism (run one process per replica); /metrics shows every replica (label `engine`) and their sum.
"""

import asyncio
from collections import OrderedDict

from lmforge.engine.async_engine import AsyncEngine, RequestStream
from lmforge.engine.config import EngineConfig
from lmforge.engine.lora_manager import LoadedAdapter, LoRARequest
from lmforge.engine.outputs import EngineStats
from lmforge.engine.sampling_params import SamplingParams

REMEMBERED_BLOCKS = 1 << 16  # leading-block hashes each replica's routing memory keeps (least recently used go)
# affinity yields when its replica has more than BUSIER x the least busy one's requests in flight + SLACK
BUSIER, SLACK = 2, 8


class PrefixRouter:
    def __init__(self, replicas: int, block_size: int):
        self.block_size = block_size
        self.seen: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(replicas)]

    def _hashes(self, ids: list[int]) -> list[int]:
        out, h, bs = [], 0, self.block_size
        for start in range(0, len(ids) - bs + 1, bs):
            h = hash((h, tuple(ids[start:start + bs])))
            out.append(h)
        return out

    def pick(self, ids: list[int] | None, loads: list[int]) -> int:
        least = min(range(len(loads)), key=loads.__getitem__)
        if ids is None:
            return least
        hashes = self._hashes(ids)
        matched = []
        for seen in self.seen:
            n = 0
            while n < len(hashes) and hashes[n] in seen:
                n += 1
            matched.append(n)
        ranked = sorted(range(len(loads)), key=lambda i: (-matched[i], loads[i]))
        best = ranked[0]
        strictly = len(ranked) == 1 or matched[best] > matched[ranked[1]]
        choice = best if strictly and loads[best] <= BUSIER * loads[least] + SLACK else least
        seen = self.seen[choice]
        for h in hashes:
            seen[h] = None
            seen.move_to_end(h)
        while len(seen) > REMEMBERED_BLOCKS:
            seen.popitem(last=False)
        return choice


class DataParallelEngine:
    """The AsyncEngine interface over `size` replicas (what lmforge/serve uses)."""

    def __init__(self, config: EngineConfig, size: int):
        self.replicas: list[AsyncEngine] = []
        try:
            for _ in range(size):
                self.replicas.append(AsyncEngine(config))
        except BaseException:
            self.shutdown()
            raise
        self.engine = self.replicas[0].engine  # config, limits, tokenizer, grammars: the same in every replica
        self.router = PrefixRouter(size, config.block_size)
        self.routed = [0] * size  # requests sent to each replica, since start

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def fatal(self) -> Exception | None:
        return next((r.fatal for r in self.replicas if r.fatal is not None), None)

    @property
    def is_alive(self) -> bool:
        return all(r.is_alive for r in self.replicas)

    def loads(self) -> list[int]:
        """Requests in flight per replica, as the server sees them: from add_request until their stream ends."""
        return [len(r._streams) for r in self.replicas]

    async def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str,
                          priority: int = 0, max_waiting: int | None = None,
                          lora_request: LoRARequest | None = None) -> RequestStream:
        index = self.router.pick(prompt if isinstance(prompt, list) else None, self.loads())
        stream = await self.replicas[index].add_request(prompt, params, request_id, priority, max_waiting,
                                                        lora_request)
        self.routed[index] += 1
        return stream

    async def abort(self, request_id: str) -> None:
        await asyncio.gather(*(r.abort(request_id) for r in self.replicas))

    async def fail_all(self, error: Exception) -> int:
        return sum(await asyncio.gather(*(r.fail_all(error) for r in self.replicas)))

    async def add_lora(self, lora_request: LoRARequest) -> LoadedAdapter:
        loaded = await asyncio.gather(*(r.add_lora(lora_request) for r in self.replicas))
        return loaded[0]

    async def remove_lora(self, name: str) -> LoadedAdapter:
        removed = await asyncio.gather(*(r.remove_lora(name) for r in self.replicas))
        return removed[0]

    async def stats(self) -> list[EngineStats]:
        return [s for stats in await asyncio.gather(*(r.stats() for r in self.replicas)) for s in stats]

    def shutdown(self, timeout: float = 5.0) -> None:
        for r in self.replicas:
            r.shutdown(timeout)
