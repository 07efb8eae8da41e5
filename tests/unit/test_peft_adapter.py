"""PEFT adapter directories both ways (lmforge <-> PEFT), resuming, `lmforge merge`, and the errors of bad ones."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lmforge.cli import main
from lmforge.config.schema import LoraConfig
from lmforge.errors import LmforgeError
from lmforge.layers.lora import add_lora, lora_layers, merge_lora
from lmforge.models import build_model
from lmforge.weights.peft import load_adapter, load_adapter_weights, read_adapter_config, save_adapter
from tests.adapters import hf_logits, ours_logits, randomize_adapter, trainable
from tests.tiny import TINY_LLAMA, write_tiny

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

SEQS = [torch.tensor([3, 1, 4, 1, 5, 9, 2, 6]), torch.tensor([7]), torch.tensor([5, 3, 5, 8, 9, 7, 9, 3, 2])]
CASES = {
    "lora": dict(rank=4, alpha=8, target_modules=["q_proj", "v_proj"]),
    "all-linear-rslora": dict(rank=8, alpha=4, target_modules="all-linear", rslora=True),
    "dora-lm-head": dict(target_modules=["q_proj", "k_proj", "down_proj"], dora=True, modules_to_save=["lm_head"]),
}


@pytest.fixture
def base(tmp_path):
    return write_tiny(tmp_path / "base")


def hf_model(path):
    return transformers.LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()


def lmforge_adapter(base, out, cfg: LoraConfig):
    model = build_model(base, dtype="float32", progress=False)
    add_lora(model, cfg)
    randomize_adapter(model)
    save_adapter(model, out, cfg, base_model=base)
    return model.eval()


def peft_adapter(base, out, cfg: LoraConfig):
    model = peft.get_peft_model(hf_model(base), peft.LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, target_modules=cfg.target_modules, use_rslora=cfg.rslora,
        use_dora=cfg.dora, modules_to_save=cfg.modules_to_save or None, task_type="CAUSAL_LM"))
    randomize_adapter(model)
    model.save_pretrained(out)
    return model.eval()


@pytest.mark.parametrize("case", CASES)
def test_lmforge_adapter_loads_in_peft(case, base, tmp_path):
    cfg = LoraConfig(**CASES[case])
    ours = lmforge_adapter(base, tmp_path / "adapter", cfg)
    theirs = peft.PeftModel.from_pretrained(hf_model(base), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours_logits(ours, SEQS), hf_logits(theirs, SEQS), atol=1e-5, rtol=1e-5)
    theirs.save_pretrained(tmp_path / "resaved")  # PEFT writes back exactly the tensors and names we wrote
    mine, resaved = load_file(tmp_path / "adapter/adapter_model.safetensors"), \
        load_file(tmp_path / "resaved/adapter_model.safetensors")
    assert mine.keys() == resaved.keys() and all(torch.equal(mine[k], resaved[k]) for k in mine)
    written = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    assert written["peft_type"] == "LORA" and written["base_model_name_or_path"] == str(base)
    assert written["use_dora"] == cfg.dora and written["use_rslora"] == cfg.rslora and written["r"] == cfg.rank


@pytest.mark.parametrize("case", CASES)
def test_peft_adapter_loads_in_lmforge(case, base, tmp_path):
    cfg = LoraConfig(**CASES[case])
    theirs = peft_adapter(base, tmp_path / "adapter", cfg)
    ours = build_model(base, dtype="float32", progress=False)
    summary = load_adapter(ours, tmp_path / "adapter")
    assert summary.trainable == 0 and len(summary.adapted) == len(lora_layers(ours)) > 0
    assert summary.saved == tuple(cfg.modules_to_save)
    with torch.no_grad():
        torch.testing.assert_close(ours_logits(ours.eval(), SEQS), hf_logits(theirs, SEQS), atol=1e-5, rtol=1e-5)
    read = read_adapter_config(tmp_path / "adapter")
    assert (read.rank, read.alpha, read.dora, read.rslora) == (cfg.rank, cfg.alpha, cfg.dora, cfg.rslora)


def test_resume_restores_the_saved_tensors(base, tmp_path):
    cfg = LoraConfig(**CASES["dora-lm-head"])
    saved = lmforge_adapter(base, tmp_path / "adapter", cfg)
    resumed = build_model(base, dtype="float32", progress=False)
    add_lora(resumed, cfg)
    load_adapter_weights(resumed, tmp_path / "adapter")
    assert all(torch.equal(p, trainable(saved)[n]) for n, p in trainable(resumed).items())
    other = build_model(base, dtype="float32", progress=False)
    add_lora(other, LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(LmforgeError, match="adapts 6 layers, the model has 2 LoRA layers"):
        load_adapter_weights(other, tmp_path / "adapter")


def test_save_is_atomic_and_leaves_other_files(base, tmp_path):
    cfg = LoraConfig()
    lmforge_adapter(base, tmp_path / "run/adapter", cfg)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["adapter"]  # no temporary directory left
    (tmp_path / "run/adapter/trainer_state.json").write_text("{}")
    model = lmforge_adapter(base, tmp_path / "run/adapter", cfg)
    assert (tmp_path / "run/adapter/trainer_state.json").is_file()
    first = next(iter(lora_layers(model)))
    with safe_open(tmp_path / "run/adapter/adapter_model.safetensors", "pt") as f:
        assert torch.equal(f.get_tensor(f"base_model.model.{first}.lora_B.weight"),
                           model.get_submodule(first).lora_B.weight)


@pytest.mark.parametrize("tied", [False, True])
def test_merge_cli_writes_what_peft_merge_and_unload_computes(tied, tmp_path):
    config = {**TINY_LLAMA, "tie_word_embeddings": tied}
    base = write_tiny(tmp_path / "base", config)
    (base / "tokenizer.json").write_text('{"model": "stand-in"}')
    cfg = LoraConfig(**CASES["dora-lm-head"])
    lmforge_adapter(base, tmp_path / "adapter", cfg)
    assert main(["merge", str(base), str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 0
    merged = tmp_path / "merged"
    assert (merged / "tokenizer.json").read_text() == '{"model": "stand-in"}'
    assert json.loads((merged / "config.json").read_text())["tie_word_embeddings"] is False
    assert not any(".lora_" in k or "base_layer" in k for k in load_file(merged / "model.safetensors"))
    reference = peft.PeftModel.from_pretrained(hf_model(base), tmp_path / "adapter").merge_and_unload().eval()
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(hf_model(merged), SEQS), hf_logits(reference, SEQS), atol=1e-5,
                                   rtol=1e-5)


def test_merge_lora_after_load_equals_the_adapter(base, tmp_path):
    lmforge_adapter(base, tmp_path / "adapter", LoraConfig(**CASES["all-linear-rslora"]))
    model = build_model(base, dtype="float32", progress=False)
    load_adapter(model, tmp_path / "adapter")
    with torch.no_grad():
        adapted = ours_logits(model, SEQS)
        merge_lora(model)
        torch.testing.assert_close(ours_logits(model, SEQS), adapted, atol=1e-5, rtol=1e-5)


def edit_config(adapter, **changes):
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def rename_keys(adapter, old, new):
    file = adapter / "adapter_model.safetensors"
    save_file({k.replace(old, new): v for k, v in load_file(file).items()}, file)


BAD = {
    "no directory": (lambda a: __import__("shutil").rmtree(a), "adapter directory .* not found"),
    "no config": (lambda a: (a / "adapter_config.json").unlink(), "has no adapter_config.json"),
    "no weights": (lambda a: (a / "adapter_model.safetensors").unlink(), "has no adapter_model.safetensors"),
    "truncated": (lambda a: (a / "adapter_model.safetensors").write_bytes(
        (a / "adapter_model.safetensors").read_bytes()[:300]), "is not a readable safetensors file"),
    "junk": (lambda a: (a / "adapter_model.safetensors").write_bytes(b"\x08" * 64),
             "is not a readable safetensors file"),
    "bad json": (lambda a: (a / "adapter_config.json").write_text("{"), "adapter_config.json is not valid JSON"),
    "rank": (lambda a: edit_config(a, r=4), r"lora_A.weight' has shape \(8, 32\), rank 8, but .* says r = 4"),
    "absent target": (lambda a: edit_config(a, target_modules=["q_proj", "c_attn"]),
                      "target module 'c_attn' matches no linear layer of the model"),
    "absent layer": (lambda a: rename_keys(a, "layers.1.", "layers.7."),
                     r"adapts model.layers.7.self_attn.q_proj, which is not a linear layer of the model"),
    "not lora": (lambda a: edit_config(a, peft_type="IA3"), "peft_type 'IA3' is not supported"),
    "rank pattern": (lambda a: edit_config(a, rank_pattern={"q_proj": 4}), "per-module ranks"),
    "fused moe experts": (lambda a: edit_config(a, target_parameters=["down_proj", "gate_up_proj"],
                                                rank_pattern={r".*\.gate_up_proj": 16}),  # as PEFT 0.22 writes
                          "target_parameters = .* routed MoE experts"),
    "dora without magnitude": (lambda a: edit_config(a, use_dora=True), "lacks .*lora_magnitude_vector"),
    "no prefix": (lambda a: rename_keys(a, "base_model.model.", ""), "lacks PEFT's 'base_model.model.' prefix"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_adapter_fails_with_one_sentence(case, base, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    lmforge_adapter(base, adapter, LoraConfig(rank=8, target_modules=["q_proj", "v_proj"]))
    damage, message = BAD[case]
    damage(adapter)
    with pytest.raises(LmforgeError, match=message) as error:
        load_adapter(build_model(base, dtype="float32", progress=False), adapter)
    assert "\n" not in str(error.value)
    assert main(["merge", str(base), str(adapter), str(tmp_path / "out")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_adapter_of_a_wider_model_names_the_key_and_the_base(base, tmp_path):
    wide = write_tiny(tmp_path / "wide", {**TINY_LLAMA, "hidden_size": 64, "intermediate_size": 96})
    lmforge_adapter(wide, tmp_path / "adapter", LoraConfig(target_modules=["o_proj"]))
    with pytest.raises(LmforgeError, match=r"o_proj.lora_A.weight' has shape \(8, 64\), the model's "
                                           r"model.layers.0.self_attn.o_proj needs \(8, 32\).*trained on .*wide"):
        load_adapter(build_model(base, dtype="float32", progress=False), tmp_path / "adapter")
