"""LLMEngine.step(final_only=True), what LLM.generate steps with: only finished requests come back, with the outputs
(text, tokens, logprobs, finish reason) that stepping with every request's progress ends with."""

from lmforge import LLM, SamplingParams
from tests.unit.tiny_server import tiny_chat_model

PROMPTS = [[5, 9, 22, 40, 7], [3, 8, 100], [9, 9, 9, 12, 13, 14, 15]]


def run(llm: LLM, final_only: bool) -> tuple[dict, list[int]]:
    for i, (prompt, n) in enumerate(zip(PROMPTS, (3, 9, 6), strict=True)):
        llm.engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True,
                                                               logprobs=1))
    last, returned = {}, []
    while llm.engine.has_unfinished_requests():
        outs = llm.engine.step(final_only=final_only)
        returned.append(len(outs))
        for out in outs:
            assert out.finished or not final_only
            assert out.outputs[0].finished() == out.finished  # vLLM's CompletionOutput.finished()
            last[out.request_id] = out
    return last, returned


def test_final_only_steps_return_finished_requests_with_the_same_outputs(tmp_path):
    # no prefix caching: the second run then computes the same batches as the first, bit for bit (a cached prompt
    # would change the rows of its steps' products, and float32 GEMMs need not round alike for other row counts)
    llm = LLM(str(tiny_chat_model(tmp_path)), dtype="float32", kv_cache_memory=0.002, block_size=4,
              enable_prefix_caching=False)
    streamed, every = run(llm, final_only=False)
    final, finished = run(llm, final_only=True)
    assert sum(finished) == 3 and max(every) == 3  # one output per request, not one per request and step
    for rid, out in final.items():
        a, b = out.outputs[0], streamed[rid].outputs[0]
        assert (a.text, a.token_ids, a.finish_reason, a.cumulative_logprob) == \
               (b.text, b.token_ids, b.finish_reason, b.cumulative_logprob)
        assert [sorted(d) for d in a.logprobs] == [sorted(d) for d in b.logprobs]
        assert out.finished and len(a.token_ids) in (3, 9, 6)
