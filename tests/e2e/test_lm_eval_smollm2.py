"""lm-evaluation-harness as a real client: a multiple-choice (log-likelihood) task and a generate_until task on local
data files, run with lm-eval's `local-completions` backend against a live `lmforge serve smollm2-135m --dtype float32`
and with lm-eval's `hf` backend (transformers) on the same weights: the same accuracy, the same answers, per-item
log-likelihoods within 1e-3."""

import json
import os

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the tasks read local files; nothing may reach the network
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")
from lm_eval.tasks import TaskManager  # noqa: E402

from tests.e2e.test_serve_smollm2 import LiveServer  # noqa: E402

pytestmark = pytest.mark.e2e

MULTIPLE_CHOICE = [
    ("What is the capital of France?", ["Paris", "London", "Madrid", "Tokyo"], 0),
    ("How many legs does a spider have?", ["six", "eight", "four", "ten"], 1),
    ("Which planet is known as the red planet?", ["Venus", "Jupiter", "Mars", "Saturn"], 2),
    ("What do bees make?", ["milk", "silk", "wool", "honey"], 3),
    ("What colour is the sky on a clear day?", ["blue", "green", "red", "black"], 0),
    ("Which animal barks?", ["cat", "dog", "fish", "bird"], 1),
    ("What is frozen water called?", ["steam", "sand", "ice", "glass"], 2),
    ("How many days are in a week?", ["five", "ten", "three", "seven"], 3),
    ("Which is the largest ocean?", ["Pacific", "Arctic", "Indian", "Southern"], 0),
    ("What is two plus two?", ["three", "four", "five", "six"], 1),
]
GENERATE = [
    ("What is the capital of Italy?", "Rome"),
    ("What is the opposite of hot?", "Cold"),
    ("What colour is grass?", "Green"),
    ("How many hours are in a day?", "24"),
    ("What is the largest planet in the solar system?", "Jupiter"),
    ("What do cows drink?", "Water"),
    ("Which animal is known as the king of the jungle?", "Lion"),
    ("What is the capital of Japan?", "Tokyo"),
]


def write_tasks(root) -> None:
    """Two lm-eval task YAMLs over JSON-lines files in root (a directory for --include_path)."""
    with open(root / "mc.jsonl", "w") as f:
        for q, choices, answer in MULTIPLE_CHOICE:
            f.write(json.dumps({"question": q, "choices": choices, "answer": answer}) + "\n")
    with open(root / "gen.jsonl", "w") as f:
        for q, answer in GENERATE:
            f.write(json.dumps({"question": q, "answer": answer}) + "\n")
    common = "dataset_path: json\ntest_split: test\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
    (root / "lmforge_mc.yaml").write_text(
        f"task: lmforge_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {root / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_choice: choices\ndoc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n")
    (root / "lmforge_gen.yaml").write_text(
        f"task: lmforge_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {root / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_target: answer\n"
        "generation_kwargs:\n  until: [\"\\n\", \".\"]\n  max_gen_toks: 12\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    ignore_case: true\n    ignore_punctuation: true\n")


def evaluate(model: str, model_args: str, tasks: TaskManager, batch_size: int) -> dict:
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["lmforge_mc", "lmforge_gen"],
                                   task_manager=tasks, batch_size=batch_size,
                                   log_samples=True, bootstrap_iters=0, random_seed=0, numpy_random_seed=0,
                                   torch_random_seed=0, fewshot_random_seed=0)


def by_doc(result: dict, task: str) -> dict[int, dict]:
    return {s["doc_id"]: s for s in result["samples"][task]}


def test_lm_eval_local_completions_equals_the_hf_backend(smollm2_dir, tmp_path):
    write_tasks(tmp_path)
    tasks = TaskManager(include_path=str(tmp_path), include_defaults=False)  # not lm-eval's thousands of YAMLs
    server = LiveServer("smollm2-135m", env={"LMFORGE_HOME": str(smollm2_dir.parent.parent)})
    try:
        served = evaluate("local-completions",
                          f"model=smollm2,base_url={server.url}/v1/completions,tokenizer={smollm2_dir},"
                          "tokenizer_backend=huggingface,tokenized_requests=True,max_retries=1,max_length=512",
                          tasks, batch_size=4)
    finally:
        assert server.stop() == 0, "".join(server.log)
    reference = evaluate("hf", f"pretrained={smollm2_dir},dtype=float32,device=cpu", tasks, batch_size=1)

    for task, metric in (("lmforge_mc", "acc,none"), ("lmforge_gen", "exact_match,none")):
        assert served["results"][task][metric] == reference["results"][task][metric], task
    ours, theirs = by_doc(served, "lmforge_mc"), by_doc(reference, "lmforge_mc")
    assert sorted(ours) == sorted(theirs) == list(range(len(MULTIPLE_CHOICE)))
    for doc_id, sample in ours.items():
        got = [ll for ll, _ in sample["filtered_resps"]]
        want = [ll for ll, _ in theirs[doc_id]["filtered_resps"]]
        assert got == pytest.approx(want, abs=1e-3), doc_id
        assert [g for _, g in sample["filtered_resps"]] == [g for _, g in theirs[doc_id]["filtered_resps"]]
        assert sample["acc"] == theirs[doc_id]["acc"]
    assert served["results"]["lmforge_mc"]["acc,none"] >= 0.5  # the model answers most of these
    ours, theirs = by_doc(served, "lmforge_gen"), by_doc(reference, "lmforge_gen")
    assert sorted(ours) == sorted(theirs) == list(range(len(GENERATE)))
    for doc_id, sample in ours.items():
        assert sample["filtered_resps"] == theirs[doc_id]["filtered_resps"], doc_id
        assert sample["exact_match"] == theirs[doc_id]["exact_match"]
