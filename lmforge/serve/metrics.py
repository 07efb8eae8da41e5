"""Prometheus metrics in text format, `lmforge:` prefix, names as vLLM's where vLLM has one.

Request metrics are recorded by the server as outputs reach it (so latencies are what a client sees, tokenizing
and queueing included). Engine state (running/waiting, KV usage, prefix cache, preemptions, steps, speculative
decoding) is read on the engine thread between two steps when /metrics is scraped, so a scrape never sees a
half-done step.
"""

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from lmforge.engine.async_engine import AsyncEngine
from lmforge.engine.outputs import EngineStats, RequestOutput
from lmforge.engine.speculative import SpecDecodeStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80, 160)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5, 5, 10, 20, 40, 80)
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 40, 50, 60, 120, 240, 480, 960, 1920)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


class _EngineCollector:
    """Exposes the latest EngineStats; counters that the engine keeps itself are exported as counters. Several
    data-parallel replicas: a series per replica (label `engine`) and their sum (engine="sum")."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        self.snapshots: list[EngineStats] = []

    def describe(self):
        return []

    def collect(self):
        if not self.snapshots:
            return
        if len(self.snapshots) == 1:
            series = [([self.model_name], self.snapshots[0])]
            labels = ["model_name"]
        else:
            series = [([self.model_name, str(i)], s) for i, s in enumerate(self.snapshots)]
            series.append(([self.model_name, "sum"], _summed(self.snapshots)))
            labels = ["model_name", "engine"]
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
        for value, s in series:
            for family in self._families(s, labels, value):
                if family.name in families:
                    families[family.name].samples.extend(family.samples)
                else:
                    families[family.name] = family
        yield from families.values()

    def _families(self, s: EngineStats, labels: list[str], value: list[str]):
        gauges = [("lmforge:num_requests_running", "Sequences in the running batch.", s.running),
                  ("lmforge:num_requests_waiting", "Sequences waiting for a slot (new or preempted).", s.waiting),
                  ("lmforge:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0 to 1).", s.kv_usage),
                  ("lmforge:kv_cache_blocks", "KV-cache blocks in the pool.", s.kv_blocks),
                  ("lmforge:prefix_cache_hit_rate", "Prompt tokens served from the prefix cache / prompt tokens "
                   "looked up, since start.", s.prefix_hits / s.prefix_queries if s.prefix_queries else 0.0)]
        for name, doc, v in gauges:
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(value, v)
            yield g
        counters = [("lmforge:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.prefix_queries),
                    ("lmforge:prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_hits),
                    ("lmforge:num_preemptions", "Sequences preempted (blocks freed, recomputed later).",
                     s.preemptions),
                    ("lmforge:engine_steps", "Model steps run by the engine.", s.steps)]
        for name, doc, v in counters:
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric(value, v)
            yield c
        if s.spec is not None:
            yield from _spec_counters(s.spec, labels, value)


def _summed(stats: list[EngineStats]) -> EngineStats:
    """The replicas' stats added up (KV usage: of all their blocks together; speculation counters: not summed)."""
    blocks = sum(s.kv_blocks for s in stats)
    return EngineStats(sum(s.running for s in stats), sum(s.waiting for s in stats),
                       sum(s.kv_usage * s.kv_blocks for s in stats) / blocks if blocks else 0.0, blocks,
                       sum(s.prefix_queries for s in stats), sum(s.prefix_hits for s in stats),
                       sum(s.preemptions for s in stats), sum(s.steps for s in stats))


def _spec_counters(spec: SpecDecodeStats, labels: list[str], value: list[str]):
    """vLLM's spec_decode_* counters (under lmforge:)."""
    for name, doc, v in (("num_drafts", "Draft proposals scored by the target model.", spec.num_drafts),
                         ("num_draft_tokens", "Draft tokens scored by the target model.", spec.num_draft_tokens),
                         ("num_accepted_tokens", "Draft tokens accepted by verification.", spec.num_accepted_tokens)):
        c = CounterMetricFamily(f"lmforge:spec_decode_{name}", doc, labels=labels)
        c.add_metric(value, v)
        yield c
    c = CounterMetricFamily("lmforge:spec_decode_num_accepted_tokens_per_pos", "Draft tokens accepted at each "
                            "position of the draft (0: the first draft token).", labels=[*labels, "position"])
    for pos, v in enumerate(spec.accepted_per_pos):
        c.add_metric([*value, str(pos)], v)
    yield c


class ServerMetrics:
    def __init__(self, model_name: str):
        disable_created_metrics()  # process-wide, as vLLM does: the *_created series only add noise to scrapes
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        self.engine_state = _EngineCollector(model_name)
        self.registry.register(self.engine_state)
        r, labels = self.registry, ["model_name"]
        self.prompt_tokens = Counter("lmforge:prompt_tokens", "Prompt tokens of admitted requests.", labels,
                                     registry=r).labels(model_name)
        self.generation_tokens = Counter("lmforge:generation_tokens", "Generated tokens.", labels,
                                         registry=r).labels(model_name)
        self.request_success = Counter("lmforge:request_success", "Finished completions by finish reason (each of "
                                       "a request's n completions counts, as in vLLM).",
                                       ["model_name", "finished_reason"], registry=r)
        self.lora_requests = Counter("lmforge:lora_requests", "Engine requests admitted per LoRA adapter.",
                                     ["model_name", "lora_name"], registry=r)
        self.rejected = Counter("lmforge:request_rejected", "Requests refused with 503 because the waiting queue "
                                "was full (--max-queue).", labels, registry=r).labels(model_name)
        self.ttft = Histogram("lmforge:time_to_first_token_seconds", "From the request's arrival to its first "
                              "token.", labels, buckets=TTFT_BUCKETS, registry=r).labels(model_name)
        self.itl = Histogram("lmforge:inter_token_latency_seconds", "Between two tokens of one completion.", labels,
                             buckets=ITL_BUCKETS, registry=r).labels(model_name)
        self.e2e = Histogram("lmforge:e2e_request_latency_seconds", "From the request's arrival to its end.", labels,
                             buckets=E2E_BUCKETS, registry=r).labels(model_name)
        self.queue_time = Histogram("lmforge:request_queue_time_seconds", "From the engine's receipt to the first "
                                    "schedule.", labels, buckets=TTFT_BUCKETS, registry=r).labels(model_name)
        self.request_prompt_tokens = Histogram("lmforge:request_prompt_tokens", "Prompt tokens per request.", labels,
                                               buckets=TOKEN_BUCKETS, registry=r).labels(model_name)
        self.request_generation_tokens = Histogram("lmforge:request_generation_tokens", "Generated tokens per "
                                                   "completion.", labels, buckets=TOKEN_BUCKETS,
                                                   registry=r).labels(model_name)

    def track(self, prompt_tokens: int, n: int, arrival: float) -> "RequestTracker":
        """Starts recording one engine request (one prompt with its n completions)."""
        self.prompt_tokens.inc(prompt_tokens)
        self.request_prompt_tokens.observe(prompt_tokens)
        return RequestTracker(self, n, arrival)

    async def render(self, engine: AsyncEngine) -> bytes:
        if engine.is_alive:
            self.engine_state.snapshots = await engine.stats()
        return generate_latest(self.registry)


class RequestTracker:
    """Token counts and latencies of one engine request, fed with each RequestOutput as the server receives it."""

    def __init__(self, metrics: ServerMetrics, n: int, arrival: float):
        self.metrics = metrics
        self.arrival = arrival
        self.seen = [0] * n  # tokens seen per completion
        self.last = [arrival] * n  # when each completion's last token arrived
        self.ttft: float | None = None
        self.finish_reasons: list[str] = []
        self.last_output: RequestOutput | None = None
        self.closed = False

    def observe(self, out: RequestOutput) -> None:
        now = time.monotonic()
        m = self.metrics
        self.last_output = out
        for i, completion in enumerate(out.outputs):
            new = len(completion.token_ids) - self.seen[i]
            if new <= 0:
                continue
            m.generation_tokens.inc(new)
            gap, count = (now - self.last[i]) / new, new
            if self.seen[i] == 0:
                count -= 1  # a completion's first token has no predecessor; the request's first one is its TTFT
                if self.ttft is None:
                    self.ttft = now - self.arrival
                    m.ttft.observe(self.ttft)
                    if out.metrics.first_scheduled_time is not None:
                        m.queue_time.observe(max(0.0, out.metrics.first_scheduled_time - out.metrics.arrival_time))
            for _ in range(count):
                m.itl.observe(gap)
            self.seen[i] = len(completion.token_ids)
            self.last[i] = now

    def close(self) -> None:
        """Records how each completion ended ("abort" for one cut short); idempotent."""
        if self.closed:
            return
        self.closed = True
        m = self.metrics
        m.e2e.observe(time.monotonic() - self.arrival)
        outputs = self.last_output.outputs if self.last_output is not None else []
        for i in range(len(self.seen)):
            reason = outputs[i].finish_reason if i < len(outputs) and outputs[i].finish_reason else "abort"
            m.request_success.labels(m.model_name, reason).inc()
            self.finish_reasons.append(reason)
            m.request_generation_tokens.observe(self.seen[i])
