"""Step graphs (lmforge/engine/cpu_graph.py): decode steps replayed from a recording equal the eager steps exactly,
are recorded again after an in-place weight update, and stay eager where the layers run anything unrecorded."""

import pytest
import torch

from lmforge import LLM, SamplingParams, kernels
from lmforge.layers.linear import SMALL_ROWS, _onednn_packing
from tests.unit.tiny_server import tiny_chat_model

pytestmark = pytest.mark.skipif(kernels.cpu_ops() is None, reason="CPU kernels unavailable")

PROMPTS = [[1 + (i * 7 + j) % 90 for j in range(3 + 5 * i)] for i in range(6)]  # 3 to 28 tokens
PARAMS = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_chat_model(tmp_path_factory.mktemp("tiny"))


def engine(path, dtype="bfloat16") -> LLM:
    # block_size 4: block tables grow every 4 tokens, past the width of the step that recorded the graph; no prefix
    # caching, so that a second run's prefill is the first one's
    return LLM(str(path), dtype=dtype, kv_cache_memory=0.002, block_size=4, max_model_len=64,
               enable_prefix_caching=False)


def generate(llm: LLM, prompts, graphs_on: bool):
    runner = llm.engine.runner
    graphs = runner.graphs
    runner.graphs = graphs if graphs_on else None
    try:
        outs = llm.generate(prompts, PARAMS, use_tqdm=False)
    finally:
        runner.graphs = graphs
    return [(list(o.outputs[0].token_ids), [sorted(d.items()) for d in o.outputs[0].logprobs]) for o in outs]


def logprob_values(result):
    return [[[(t, lp.logprob) for t, lp in step] for step in steps] for _, steps in result]



@pytest.mark.parametrize("level", kernels.levels())
def test_the_recorded_kernels_are_the_step_graphs_methods(level):
    """kernels.GRAPH_* (what cpu_graph.py records or passes through) names exactly the kernels StepGraph records,
    and each of them is a kernel of the module."""
    with kernels.level(level) as ops:
        recorder = {"add_tensors", "external", "set_inputs", "guard", "size", "run"}  # not kernels
        methods = {name for name in dir(ops.StepGraph) if not name.startswith("_")} - recorder
        assert methods == {*kernels.GRAPH_RETURNING, *kernels.GRAPH_IN_PLACE}
        for name in (*kernels.GRAPH_RETURNING, *kernels.GRAPH_IN_PLACE, *kernels.GRAPH_QUERIES):
            assert callable(getattr(ops, name)), name
        quant = kernels.quant_ops()
        if quant is not None:
            assert all(callable(getattr(quant, name)) for name in kernels.GRAPH_QUANT_RETURNING)

@pytest.mark.parametrize("level", kernels.levels())
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("batch", [1, 3, 6], ids=["gemv", "gemv-3-rows", "gemm"])
def test_replayed_decode_steps_equal_eager_ones(tiny_dir, batch, dtype, level):
    """Every kernel level this CPU runs and both dtypes: float32 products and bf16 ones that no GEMM of this CPU
    serves are recorded as ATen's own product (the `linear` kernel). Where this level's build has no bf16 GEMM but
    torch's oneDNN packs bf16 weights (an AVX512-BF16 or AMX CPU running a lower level), the GEMM is oneDNN's, which
    no graph records: those steps stay eager, with the same outputs."""
    with kernels.level(level) as ops:
        llm = engine(tiny_dir, dtype)
        graphs = llm.engine.runner.graphs
        assert llm.engine.runner.fast_paths == "CPU kernels, step graphs"
        eager = generate(llm, PROMPTS[:batch], graphs_on=False)
        assert graphs.replays == graphs.recordings == 0
        replayed = generate(llm, PROMPTS[:batch], graphs_on=True)
        onednn = dtype == "bfloat16" and batch > SMALL_ROWS and not ops.amx_available() and \
            not ops.vnni_available() and _onednn_packing()
    assert [t for t, _ in replayed] == [t for t, _ in eager]
    assert logprob_values(replayed) == logprob_values(eager)  # the same kernels on the same data: bit for bit
    if onednn:
        assert batch in graphs.eager and graphs.replays == 0
        return
    assert batch in graphs.graphs and not graphs.eager
    assert graphs.replays >= 20  # most of the 24 decode steps replayed, not recorded
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_in_place_weight_update_records_again(tiny_dir):
    llm = engine(tiny_dir)
    graphs = llm.engine.runner.graphs
    generate(llm, PROMPTS[:2], graphs_on=True)
    before = graphs.graphs[2][0]
    with torch.no_grad():
        llm.engine.model.model.layers[1].mlp.down_proj.weight.mul_(-1.5)  # an RL weight sync does this in place
    replayed = generate(llm, PROMPTS[:2], graphs_on=True)
    assert graphs.graphs[2][0] is not before  # the decode steps' graph was recorded again
    assert replayed == generate(llm, PROMPTS[:2], graphs_on=False)


def test_graphs_beyond_the_memory_cap_are_dropped_oldest_first(tiny_dir, monkeypatch):
    from lmforge.engine import cpu_graph

    monkeypatch.setattr(cpu_graph, "MAX_GRAPH_BYTES", 1)
    llm = engine(tiny_dir)
    graphs = llm.engine.runner.graphs
    generate(llm, PROMPTS[:1], graphs_on=True)
    assert list(graphs.graphs) == [1] and graphs.nbytes > 1  # the newest is always kept
    generate(llm, PROMPTS[:2], graphs_on=True)
    assert list(graphs.graphs) == [2]


def test_a_recurring_prefill_too_large_to_keep_stays_eager_and_spares_the_decode_graphs(tiny_dir, monkeypatch):
    """A whole batch's prefill recurs when a benchmark repeats its prompts: kept, its intermediates (1.6 GB for
    SmolLM2's 64-prompt batch) would evict the decode steps' graphs each round and be evicted by them. Above the
    multi-token budget it is recorded at most once, not kept, and the decode steps' graph stays."""
    from lmforge.engine import cpu_graph

    monkeypatch.setattr(cpu_graph, "MAX_MULTI_TOKEN_GRAPH_BYTES", 1)
    llm = engine(tiny_dir)
    graphs = llm.engine.runner.graphs
    recorded = []
    record = graphs._record
    monkeypatch.setattr(graphs, "_record", lambda key, *args: recorded.append(key) or record(key, *args))
    first = SamplingParams(temperature=0, max_tokens=1, logprobs=2)  # prefill steps only
    eager = llm.generate(PROMPTS, first, use_tqdm=False)
    for _ in range(3):  # seen once, recorded (size unknown yet) and dropped, then predicted too large
        outs = llm.generate(PROMPTS, first, use_tqdm=False)
        assert [o.outputs[0].logprobs for o in outs] == [o.outputs[0].logprobs for o in eager]
    assert len(recorded) == 1 and isinstance(recorded[0], tuple) and not graphs.graphs and graphs.bytes_per_token > 0

    generate(llm, PROMPTS, graphs_on=True)
    decode_graph = graphs.graphs[len(PROMPTS)][0]
    replayed = generate(llm, PROMPTS, graphs_on=True)
    assert list(graphs.graphs) == [len(PROMPTS)] and graphs.graphs[len(PROMPTS)][0] is decode_graph
    assert replayed == generate(llm, PROMPTS, graphs_on=False)


@pytest.mark.parametrize("batch", [1, 3])
def test_speculative_steps_replay_graphs_of_their_shape(tiny_dir, batch):
    """Verification steps score 1 + k tokens per sequence: recorded per (tokens, sequences) once a shape recurs and
    replayed bit for bit, so speculation keeps the graphs' speed (float32: the small-rows kernel)."""
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
    motifs = [[(i * 7 + j * 3) % 40 + 3 for j in range(5 + i)] for i in range(batch)]
    prompts = [(m * 8)[:30] for m in motifs]  # repeating: the tiny model's continuations copy them, drafts accepted
    llm = LLM(str(tiny_dir), dtype="float32", kv_cache_memory=0.004, block_size=4, max_model_len=96,
              enable_prefix_caching=False, speculative_config=spec)
    eager = generate(llm, prompts, graphs_on=False)
    graphs = llm.engine.runner.graphs
    replayed = generate(llm, prompts, graphs_on=True)
    assert replayed == eager  # tokens and log-probs, bit for bit
    multi = [key for key in graphs.seen if isinstance(key, tuple)]
    assert multi and all(tokens > seqs == batch for tokens, seqs in multi), graphs.seen
    assert llm.engine.spec_stats.num_accepted_tokens > 0 and graphs.replays >= 5 and not graphs.eager


def test_a_forward_over_another_kv_cache_stays_eager(tiny_dir):
    """Graphs write into the engine's KV pool: a forward over another cache (a caller's own, as in an evaluation)
    of a recorded shape must run the layers, not replay into the engine's pool."""
    from lmforge.engine.model_runner import layer_kv_cache
    from lmforge.layers.attention import AttnMeta

    llm = engine(tiny_dir, dtype="float32")
    generate(llm, PROMPTS[:1], graphs_on=True)
    runner, graphs = llm.engine.runner, llm.engine.runner.graphs
    assert 1 in graphs.graphs
    replays = graphs.replays

    def decode_over_own_cache():
        kv = [layer_kv_cache(layer[0].shape, layer[0].dtype, runner.device) for layer in runner.kv]
        table = torch.zeros(1, 4, dtype=torch.long)
        with torch.inference_mode():
            for pos, token in enumerate([5, 9, 13, 2]):  # one token a step: the recorded decode shape
                meta = AttnMeta.for_paged([1], [pos + 1], torch.tensor([pos]), table, block_size=4)
                out = runner.model(torch.tensor([token]), torch.tensor([pos]), meta, kv)
        return out

    with runner.context():  # the engine's weights and kernels, its graphs in reach: still the layers run
        replayable = decode_over_own_cache()
        assert graphs.replays == replays
        assert graphs(replayable[:1].clone(), runner.decoder.embed(torch.tensor([5]), torch.tensor([0]))[1],
                      AttnMeta.for_paged([1], [1], torch.tensor([0]), torch.zeros(1, 4, dtype=torch.long),
                                         block_size=4), [layer for layer in runner.kv]) is None


def test_an_op_without_a_kernel_keeps_the_step_eager(tiny_dir, caplog):
    """A layer running an aten op that no kernel records: each batch size stays eager, once logged, and outputs
    are the eager ones."""
    llm = engine(tiny_dir, dtype="float32")
    graphs = llm.engine.runner.graphs
    layer = llm.engine.model.model.layers[0]
    forward = layer.forward
    layer.forward = lambda x, rope, meta, kv: torch.tanh(forward(x, rope, meta, kv))
    with caplog.at_level("INFO", logger="lmforge"):
        outs = generate(llm, PROMPTS[:2], graphs_on=True)
    assert graphs.eager == {2} and not graphs.graphs and graphs.replays == 0
    assert "steps of 2 sequences stay eager (aten.tanh" in caplog.text
    assert outs == generate(llm, PROMPTS[:2], graphs_on=False)


def test_a_tensor_from_outside_the_layers_keeps_the_step_eager(tiny_dir, caplog):
    """A layer reading a tensor that the replay would not refresh (made outside the recorded layers, not a weight
    or the cache) must not be replayed: the recording is dropped and the step stays eager."""
    llm = engine(tiny_dir)
    graphs = llm.engine.runner.graphs
    layer = llm.engine.model.model.layers[0]
    outside = torch.zeros(1, 32, dtype=torch.bfloat16)
    forward = layer.forward
    layer.forward = lambda x, rope, meta, kv: forward(x, rope, meta, kv) + outside
    with caplog.at_level("INFO", logger="lmforge"):
        generate(llm, PROMPTS[:1], graphs_on=True)
    assert graphs.eager == {1} and graphs.replays == 0
    assert "reads a tensor made outside the recorded layers" in caplog.text


def test_enforce_eager_has_no_graphs(tiny_dir):
    llm = LLM(str(tiny_dir), dtype="bfloat16", kv_cache_memory=0.002, block_size=4, enforce_eager=True)
    assert llm.engine.runner.graphs is None


def test_async_engine_replays_on_its_own_thread(tiny_dir):
    """The server's engine steps on a thread of its own: graphs record and replay there (the replay releases the
    GIL), and two concurrent streams get what each prompt gets alone, eagerly."""
    import asyncio

    from lmforge import AsyncEngine

    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    server = AsyncEngine(model=str(tiny_dir), dtype="bfloat16", kv_cache_memory=0.002, block_size=4,
                          max_model_len=64, enable_prefix_caching=False)
    try:
        async def stream(i: int) -> list[int]:
            async for out in server.generate(PROMPTS[i], params, f"r{i}"):
                last = out
            return list(last.outputs[0].token_ids)

        async def both():
            return await asyncio.gather(stream(1), stream(4))

        streamed = asyncio.run(both())
        assert server.engine.runner.graphs.replays >= 20
    finally:
        server.shutdown()
    llm = engine(tiny_dir)
    alone = [generate(llm, [PROMPTS[i]], graphs_on=False)[0][0] for i in (1, 4)]
    assert streamed == alone


class _WithoutAMX:
    """The kernels as a CPU without AMX sees them (AMD Zen 4/5): linears take the AVX512-BF16 GEMM."""

    def __init__(self, ops):
        self._ops = ops

    def amx_available(self) -> bool:
        return False

    def __getattr__(self, name: str):
        return getattr(self._ops, name)


@pytest.mark.skipif(kernels.cpu_ops() is None or not kernels.cpu_ops().vnni_available(),
                    reason="needs AVX512-BF16")
def test_graphs_replay_the_avx512_gemm_of_cpus_without_amx(tiny_dir, monkeypatch):
    monkeypatch.setitem(kernels._state, "ops", _WithoutAMX(kernels.cpu_ops()))
    llm = engine(tiny_dir)  # weights packed for the AVX512-BF16 GEMM at warm-up
    eager = generate(llm, PROMPTS[:5], graphs_on=False)
    assert generate(llm, PROMPTS[:5], graphs_on=True) == eager
    assert 5 in llm.engine.runner.graphs.graphs
    assert llm.engine.runner.derived.packs[llm.engine.model.model.layers[0].mlp.down_proj]._packed[1] == "vnni"
