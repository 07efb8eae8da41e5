"""Reward models: scores against transformers' *ForSequenceClassification on the saved directory, loading back,
packed vs alone, LoRA / DoRA / QLoRA merged on save, and the Bradley-Terry loss and metrics against TRL's own
RewardTrainer.compute_loss."""

import json
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from lmforge.config.schema import LoraConfig
from lmforge.errors import LmforgeError
from lmforge.layers.attention import AttnMeta
from lmforge.layers.lora import add_lora, lora_layers
from lmforge.models import build_model
from lmforge.train.reward import (
    accuracy,
    bradley_terry_loss,
    load_reward_model,
    merged_weight,
    reward_metrics,
    reward_model_from,
    save_reward_model,
    scored_tokens,
)
from tests.adapters import randomize_adapter
from tests.tiny import TINY_LLAMA, write_tiny
from tests.tokenizer_refs import llama_style_dir

PAD = 0
# Different lengths; the last one ends in two pad tokens, which transformers (and lmforge) skip.
SEQS = [torch.tensor(s) for s in ([5, 17, 3], [9, 1, 44, 2, 8, 61, 7], list(range(30, 42)), [12, 40, 6, PAD, PAD])]
FAMILIES = {
    "llama": {},
    "llama-tied": {"tie_word_embeddings": True},
    "qwen2": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"},
    "qwen3": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "head_dim": 16},
    "phi3": {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3"},
    "mixtral": {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_local_experts": 4,
                "num_experts_per_tok": 2},
    "qwen2moe": {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "num_experts": 4,
                 "num_experts_per_tok": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48,
                 "mlp_only_layers": [1]},
}


def base_dir(tmp_path, **config):
    path = write_tiny(tmp_path / "base", {**TINY_LLAMA, **config})
    return llama_style_dir(path)


def reward_model(path, seed=0):
    model = reward_model_from(build_model(path, torch.float32, progress=False), pad_token_id=PAD, seed=seed)
    with torch.no_grad():  # a head larger than transformers' init (std 0.02), so score differences are not tiny
        model.score.weight.mul_(50)
    return model.eval()


def packed_scores(model, seqs):
    ids = torch.cat(seqs)
    positions = torch.cat([torch.arange(len(s)) for s in seqs])
    with torch.no_grad():
        return model(ids, positions, AttnMeta.for_sequences([len(s) for s in seqs]))


def hf_padded_scores(hf, seqs, side):
    """One padded batch through transformers; positions counted over the real tokens, as generate() does."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), PAD)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[i, cols], mask[i, cols] = s, 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        return hf(ids, attention_mask=mask, position_ids=positions).logits[:, 0]


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_loads_the_directory_with_the_same_scores(tmp_path, family):
    import transformers

    src = base_dir(tmp_path, **FAMILIES[family])
    model = reward_model(src)
    save_reward_model(model, tmp_path / "rm", source_dir=src)
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    causal = FAMILIES[family].get("architectures", ["LlamaForCausalLM"])[0]
    assert config["architectures"] == [causal.replace("ForCausalLM", "ForSequenceClassification")]
    assert (config["num_labels"], config["pad_token_id"]) == (1, PAD)
    assert (tmp_path / "rm" / "tokenizer.json").is_file() and (tmp_path / "rm" / "tokenizer_config.json").is_file()

    hf, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "rm", dtype=torch.float32, output_loading_info=True)
    assert type(hf).__name__ == config["architectures"][0] and hf.config.num_labels == 1
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ours = packed_scores(model, SEQS)
    with torch.no_grad():
        alone = torch.cat([hf(s[None]).logits[0] for s in SEQS])
    torch.testing.assert_close(ours, alone, atol=1e-4, rtol=0)
    for side in ("right", "left"):
        torch.testing.assert_close(ours, hf_padded_scores(hf.eval(), SEQS, side), atol=1e-4, rtol=0)
    assert ours.std() > 0.1  # the head separates the sequences: the comparison is not between near-zeros


def test_loading_back_gives_identical_scores(tmp_path):
    src = base_dir(tmp_path)
    model = reward_model(src)
    save_reward_model(model, tmp_path / "rm", source_dir=src)
    loaded = load_reward_model(tmp_path / "rm")
    assert not loaded.training and loaded.pad_token_id == PAD
    assert torch.equal(packed_scores(loaded, SEQS), packed_scores(model, SEQS))
    save_reward_model(loaded, tmp_path / "again")  # a loaded model saves the same directory again
    assert torch.equal(packed_scores(load_reward_model(tmp_path / "again"), SEQS), packed_scores(model, SEQS))


def test_a_directory_transformers_wrote_loads(tmp_path):
    import transformers

    src = base_dir(tmp_path)
    model = reward_model(src)
    save_reward_model(model, tmp_path / "rm", source_dir=src)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm", dtype=torch.float32)
    hf.save_pretrained(tmp_path / "hf")
    loaded = load_reward_model(tmp_path / "hf")
    assert torch.equal(packed_scores(loaded, SEQS), packed_scores(model, SEQS))


def test_packed_scores_equal_each_document_alone(tmp_path):
    model = reward_model(base_dir(tmp_path))
    packed = packed_scores(model, SEQS)
    alone = torch.cat([packed_scores(model, [s]) for s in SEQS])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)


def test_the_head_starts_as_transformers_inits_it_from_the_seed(tmp_path):
    path = base_dir(tmp_path)
    first = reward_model_from(build_model(path, torch.float32, progress=False), seed=3)
    again = reward_model_from(build_model(path, torch.float32, progress=False), seed=3)
    other = reward_model_from(build_model(path, torch.float32, progress=False), seed=4)
    weight = first.score.weight
    assert torch.equal(weight, again.score.weight) and not torch.equal(weight, other.score.weight)
    assert weight.shape == (1, TINY_LLAMA["hidden_size"]) and abs(weight.std().item() - 0.02) < 0.006
    assert sorted(n for n, _ in first.named_parameters() if not n.startswith("model.")) == ["score.weight"]


def test_scored_tokens_skip_trailing_pads_and_check_the_offsets():
    ids = torch.tensor([4, 5, PAD, 7, PAD, PAD, 9, PAD, 3])
    cu = torch.tensor([0, 3, 6, 9])
    assert scored_tokens(ids, cu, PAD).tolist() == [1, 3, 8]  # a pad inside a document is not its end
    assert scored_tokens(ids, cu, None).tolist() == [2, 5, 8]
    assert scored_tokens(torch.tensor([PAD, PAD, 5]), torch.tensor([0, 2, 3]), PAD).tolist() == [0, 2]
    with pytest.raises(ValueError, match="covers 8 tokens"):
        scored_tokens(ids, torch.tensor([0, 3, 8]), PAD)
    with pytest.raises(ValueError, match="at least one token"):
        scored_tokens(ids, torch.tensor([0, 3, 3, 9]), PAD)


@pytest.mark.parametrize("method", ["lora", "dora", "qlora"])
def test_a_lora_reward_model_saves_merged_and_keeps_training(tmp_path, method):
    import transformers

    src = base_dir(tmp_path)
    model = reward_model(src)
    cfg = LoraConfig(rank=4, target_modules=["q_proj", "v_proj", "down_proj"], dora=method == "dora",
                     modules_to_save=["score"])
    add_lora(model, cfg, quantize=method == "qlora")
    assert model.score.weight.requires_grad
    randomize_adapter(model)
    model.eval()
    before = packed_scores(model, SEQS)
    save_reward_model(model, tmp_path / "rm", source_dir=src)
    assert len(lora_layers(model)) == 6 and torch.equal(packed_scores(model, SEQS), before)  # model unchanged
    loaded = load_reward_model(tmp_path / "rm")
    torch.testing.assert_close(packed_scores(loaded, SEQS), before, atol=1e-5, rtol=0)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm", dtype=torch.float32)
    torch.testing.assert_close(hf_padded_scores(hf.eval(), SEQS, "right"), before, atol=1e-4, rtol=0)


def test_merged_weight_is_what_merge_leaves(tmp_path):
    model = reward_model(base_dir(tmp_path))
    add_lora(model, LoraConfig(rank=4, target_modules=["o_proj"], dora=True))
    randomize_adapter(model)
    layer = model.model.layers[0].self_attn.o_proj
    aside = merged_weight(layer)
    assert torch.equal(layer.merge().weight, aside)


def test_load_reward_model_names_what_is_wrong(tmp_path):
    src = base_dir(tmp_path)
    with pytest.raises(LmforgeError, match="no sequence-classification"):
        load_reward_model(src)  # a causal LM
    save_reward_model(reward_model(src), tmp_path / "rm")
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    (tmp_path / "rm" / "config.json").write_text(json.dumps({**config, "num_labels": 3}))
    with pytest.raises(LmforgeError, match="3 labels; a reward model has one"):
        load_reward_model(tmp_path / "rm")


def trl_compute_loss_on(model, inputs, center=None):
    """TRL's RewardTrainer.compute_loss, run on an object with just the attributes it reads (one process: gathers
    are the identity); returns the loss and the metrics it logged."""
    from trl import RewardTrainer

    metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    identity = SimpleNamespace(gather=lambda t: t, gather_for_metrics=lambda t: t)
    trainer = SimpleNamespace(model=model, args=SimpleNamespace(center_rewards_coefficient=center),
                              accelerator=identity, _metrics=metrics, _total_train_tokens=0, _tp_size=1)
    loss = RewardTrainer.compute_loss(trainer, model, inputs)
    mode = "train" if model.training else "eval"
    return loss, {k: v[0] for k, v in metrics[mode].items() if k != "num_tokens"}


class Rewards(torch.nn.Module):
    """A stand-in model whose logits are given rewards (chosen rows first, as TRL's collator stacks them)."""

    def __init__(self, chosen, rejected):
        super().__init__()
        self.logits = torch.cat([chosen, rejected])[:, None]

    def forward(self, **inputs):
        return SimpleNamespace(logits=self.logits)


def trl_compute_loss(chosen, rejected, margin=None, center=None):
    inputs = {"input_ids": torch.zeros(2 * len(chosen), 1, dtype=torch.long)}
    if margin is not None:
        inputs["margin"] = margin
    return trl_compute_loss_on(Rewards(chosen, rejected).eval(), inputs, center)


@pytest.mark.parametrize("margin", [False, True])
@pytest.mark.parametrize("center", [None, 0.01])
def test_bradley_terry_loss_and_metrics_equal_trl(margin, center):
    gen = torch.Generator().manual_seed(0)
    chosen = torch.randn(16, generator=gen) * 2
    rejected = torch.randn(16, generator=gen) * 2
    rejected[3] = chosen[3]  # a tie is not a correct pair
    margins = torch.rand(16, generator=gen) if margin else None
    ours_c, ours_r = chosen.clone().requires_grad_(), rejected.clone().requires_grad_()
    ref_c, ref_r = chosen.clone().requires_grad_(), rejected.clone().requires_grad_()

    ours = bradley_terry_loss(ours_c, ours_r, margins, center)
    ref, ref_metrics = trl_compute_loss(ref_c, ref_r, margins, center)
    assert ours.shape == (16,)
    torch.testing.assert_close(ours.mean(), ref, atol=1e-6, rtol=0)
    ours.mean().backward()
    ref.backward()
    torch.testing.assert_close(ours_c.grad, ref_c.grad, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours_r.grad, ref_r.grad, atol=1e-6, rtol=0)
    assert accuracy(chosen, rejected).mean().item() == ref_metrics["accuracy"]
    assert reward_metrics(chosen, rejected) == pytest.approx(ref_metrics, abs=1e-6)


def test_training_gradients_equal_trl_on_transformers(tmp_path):
    """One reward step end to end: TRL's compute_loss on transformers' classifier (a right-padded batch, chosen
    rows first) and lmforge's packed batch give the same loss and the same gradient for every parameter."""
    import transformers

    src = base_dir(tmp_path)
    model = reward_model(src)
    save_reward_model(model, tmp_path / "rm", source_dir=src)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm", dtype=torch.float32)
    pairs = 2  # SEQS[:2] chosen, SEQS[2:] rejected
    margin = torch.tensor([0.5, -0.25])
    width = max(len(s) for s in SEQS)
    ids = torch.full((len(SEQS), width), PAD)
    mask = torch.zeros(len(SEQS), width, dtype=torch.long)
    for i, s in enumerate(SEQS):
        ids[i, :len(s)], mask[i, :len(s)] = s, 1
    ref, _ = trl_compute_loss_on(hf.train(), {"input_ids": ids, "attention_mask": mask, "margin": margin}, 0.01)
    ref.backward()

    model.train()
    ids_flat = torch.cat(SEQS)
    positions = torch.cat([torch.arange(len(s)) for s in SEQS])
    scores = model(ids_flat, positions, AttnMeta.for_sequences([len(s) for s in SEQS]))
    loss = bradley_terry_loss(scores[:pairs], scores[pairs:], margin, 0.01).mean()
    loss.backward()
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=0)
    theirs = dict(hf.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, theirs[name].grad, atol=1e-4, rtol=1e-4, msg=name)
