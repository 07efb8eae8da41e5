"""GGUF import on tiny synthetic files written with gguf.GGUFWriter (the way llama.cpp's converter writes them)."""

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize, quantize
from safetensors.torch import load_file
from tokenizers import Tokenizer

from lmforge.errors import LmforgeError
from lmforge.layers.attention import AttnMeta
from lmforge.models import build_model
from lmforge.weights.gguf_import import convert_gguf

Q = gguf.GGMLQuantizationType
HIDDEN, FFN, HEADS, KV_HEADS, LAYERS = 64, 96, 4, 2, 2
HEAD_DIM = HIDDEN // HEADS
# A byte-level vocabulary just big enough to spell "hello world" and test merges and special tokens.
TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", *"helowrdĠ1", "he", "ll", "hell", "hello",
          "Ġw", "Ġwor", "Ġworld", "or", "ld", "ĠĠ"]
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "Ġ Ġ"]
VOCAB = len(TOKENS)
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
# GGUFWriter.add_<key>(value) calls that describe the tokenizer, as llama.cpp writes them for SmolLM2.
GPT2_TOKENIZER = {"tokenizer_model": "gpt2", "tokenizer_pre": "smollm", "token_list": TOKENS,
                  "token_types": [3, 3, 3, 4] + [1] * (VOCAB - 4), "token_merges": MERGES, "bos_token_id": 1,
                  "eos_token_id": 2, "chat_template": TEMPLATE}


def hf_weights(tied: bool = False, bias: bool = False, o_bias: bool = False, ffn: int = FFN) -> dict[str, np.ndarray]:
    """Random weights under their HF names and shapes; bias: q/k/v biases (Qwen2), o_bias: also o_proj's (Llama)."""
    rng = np.random.default_rng(0)
    w = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,)}
    if not tied:
        w["lm_head.weight"] = (VOCAB, HIDDEN)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w |= {p + "self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN),
              p + "self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
              p + "self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
              p + "self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
              p + "mlp.gate_proj.weight": (ffn, HIDDEN), p + "mlp.up_proj.weight": (ffn, HIDDEN),
              p + "mlp.down_proj.weight": (HIDDEN, ffn),
              p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,)}
        if bias:
            w |= {p + "self_attn.q_proj.bias": (HEADS * HEAD_DIM,), p + "self_attn.k_proj.bias": (KV_HEADS * HEAD_DIM,),
                  p + "self_attn.v_proj.bias": (KV_HEADS * HEAD_DIM,)}
        if o_bias:
            w[p + "self_attn.o_proj.bias"] = (HIDDEN,)
    return {name: rng.standard_normal(shape).astype(np.float32) * 0.5 for name, shape in w.items()}


GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def gguf_name(hf: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf in top:
        return top[hf]
    _, _, layer, *module, kind = hf.split(".")
    return f"blk.{layer}.{GGUF_NAMES['.'.join(module)]}.{kind}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What convert_hf_to_gguf does to llama q/k rows: each head's two rotary halves interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, weights: dict[str, np.ndarray], qtype: Q = Q.F32, arch: str = "llama",
               meta: dict | None = None, extra_tensors: dict[str, np.ndarray] | None = None,
               raw: dict[str, tuple[np.ndarray, Q]] | None = None) -> Path:
    """raw: already-encoded tensors under GGUF names, written as they are."""
    w = gguf.GGUFWriter(path, arch)
    model = {"context_length": 128, "embedding_length": HIDDEN, "block_count": LAYERS, "head_count": HEADS,
             "feed_forward_length": weights["model.layers.0.mlp.up_proj.weight"].shape[0],
             "head_count_kv": KV_HEADS, "layer_norm_rms_eps": 1e-5, "rope_freq_base": 10000.0}
    for key, value in {**model, **GPT2_TOKENIZER, **(meta or {})}.items():
        if value is not None:  # None leaves a default key out
            getattr(w, f"add_{key}")(value)
    for name, value in weights.items():
        heads = {"q_proj": HEADS, "k_proj": KV_HEADS}.get(name.rsplit(".", 2)[-2])
        if heads and arch == "llama":
            value = llama_cpp_permute(value, heads)
        if value.ndim == 1 or qtype == Q.F32:  # llama.cpp keeps norms and biases in F32
            w.add_tensor(gguf_name(name), value)
        elif qtype == Q.F16:
            w.add_tensor(gguf_name(name), value.astype(np.float16))
        else:
            w.add_tensor(gguf_name(name), quantize(value, qtype), raw_dtype=qtype)
    for name, value in (extra_tensors or {}).items():
        w.add_tensor(name, value)
    for name, (value, raw_type) in (raw or {}).items():
        w.add_tensor(name, value, raw_dtype=raw_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def convert(tmp_path: Path, weights=None, **kwargs) -> tuple[Path, dict[str, torch.Tensor], dict]:
    src = write_gguf(tmp_path / "tiny.gguf", hf_weights() if weights is None else weights, **kwargs)
    out = convert_gguf(src, tmp_path / "hf", progress=False)
    return out, load_file(out / "model.safetensors"), json.loads((out / "config.json").read_text())


# Quantization error bound relative to the tensor's largest magnitude: half a level, or a whole one where the
# symmetric types clip the block's extreme (Q4_0 and Q5_0 map it to -8 and -16 levels, the other side stops short).
TOLERANCE = {Q.F32: 0, Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 1e-2, Q.Q5_0: 7e-2, Q.Q5_1: 4e-2, Q.Q4_0: 1.3e-1,
             Q.Q4_1: 1e-1}


@pytest.mark.parametrize("qtype", TOLERANCE, ids=lambda q: q.name)
def test_dequantized_weights_match_originals_within_quantization_error(tmp_path, qtype):
    weights = hf_weights()
    _, state, cfg = convert(tmp_path, weights, qtype=qtype)
    assert set(state) == set(weights)
    for name, original in weights.items():
        ours = state[name]
        assert ours.dtype == torch.float32 and tuple(ours.shape) == original.shape, name
        if original.ndim == 2 and qtype not in (Q.F32, Q.F16):  # exactly what the gguf package decodes
            roundtrip = dequantize(quantize(original, qtype), qtype)
            assert torch.equal(ours, torch.from_numpy(np.asarray(roundtrip, dtype=np.float32))), name
        bound = TOLERANCE[qtype] * np.abs(original).max() if original.ndim == 2 else 0
        assert (ours - torch.from_numpy(original)).abs().max().item() <= bound, name
    assert cfg["torch_dtype"] == "float32"


@pytest.mark.parametrize("qtype,block_bytes,scale_at", [(Q.Q4_K, 144, (0, 2)), (Q.Q5_K, 176, (0, 2)),
                                                        (Q.Q6_K, 210, (208,))], ids=["Q4_K", "Q5_K", "Q6_K"])
def test_k_quants_decode_with_hf_shapes(tmp_path, qtype, block_bytes, scale_at):
    """gguf can decode but not encode K-quants: write random blocks with sane fp16 scales."""
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, (HIDDEN, block_bytes), dtype=np.uint8)
    for at in scale_at:
        blocks[:, at:at + 2] = np.full((HIDDEN, 1), 0.01, np.float16).view(np.uint8)
    weights = {n: v for n, v in hf_weights(ffn=256).items() if "down_proj" not in n}  # 256 values a block
    raw = {f"blk.{i}.ffn_down.weight": (blocks, qtype) for i in range(LAYERS)}
    out = convert_gguf(write_gguf(tmp_path / "k.gguf", weights, raw=raw), tmp_path / "hf", progress=False)
    down = load_file(out / "model.safetensors")["model.layers.0.mlp.down_proj.weight"]
    assert down.shape == (HIDDEN, 256)
    assert torch.equal(down, torch.from_numpy(np.asarray(dequantize(blocks, qtype), dtype=np.float32)))
    assert torch.isfinite(down).all()


def test_qk_permutation_round_trips_with_bias(tmp_path):
    weights = hf_weights(bias=True, o_bias=True)
    _, state, cfg = convert(tmp_path, weights)
    assert cfg["attention_bias"] is True
    for name, original in weights.items():  # the file holds permuted q/k rows and biases; we recover HF's
        assert torch.equal(state[name], torch.from_numpy(original)), name


def test_qwen2_rows_are_not_permuted(tmp_path):
    weights = hf_weights(bias=True)
    _, state, cfg = convert(tmp_path, weights, arch="qwen2")
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and "attention_bias" not in cfg
    for name, original in weights.items():
        assert torch.equal(state[name], torch.from_numpy(original)), name


@pytest.mark.parametrize("tied", [True, False])
def test_tied_and_untied_output_build_and_run(tmp_path, tied):
    weights = hf_weights(tied=tied)
    out, state, cfg = convert(tmp_path, weights)
    assert cfg["tie_word_embeddings"] is tied
    assert ("lm_head.weight" in state) is not tied
    model = build_model(out, progress=False)
    expected = weights["model.embed_tokens.weight" if tied else "lm_head.weight"]
    assert torch.equal(model.lm_head.weight, torch.from_numpy(expected))
    with torch.no_grad():
        logits = model.logits(model(torch.tensor([4, 5, 6]), torch.arange(3), AttnMeta.for_sequences([3])))
    assert logits.shape == (3, VOCAB) and torch.isfinite(logits).all()


def test_config_and_generation_config(tmp_path):
    out, _, cfg = convert(tmp_path, meta={"rope_scaling_type": gguf.RopeScalingType.LINEAR,
                                          "rope_scaling_factor": 2.0, "eot_token_id": 0})
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (HIDDEN, FFN, LAYERS)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (HEADS, KV_HEADS, HEAD_DIM)
    assert (cfg["vocab_size"], cfg["max_position_embeddings"], cfg["rms_norm_eps"]) == (VOCAB, 128, 1e-5)
    assert cfg["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": [2, 0]}


def test_llama3_rope_freqs_become_rope_scaling(tmp_path):
    from lmforge.layers.rope import RopeConfig, _base_inv_freq, _llama3

    params = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    theta = 500000.0
    base = _base_inv_freq(theta, HEAD_DIM)
    divisors = (base / _llama3(RopeConfig("llama3", theta, HEAD_DIM, 131072, params), base)).numpy()
    src = write_gguf(tmp_path / "l3.gguf", hf_weights(), meta={"rope_freq_base": theta},
                     extra_tensors={"rope_freqs.weight": divisors.astype(np.float32)})
    cfg = json.loads((convert_gguf(src, tmp_path / "hf", progress=False) / "config.json").read_text())
    assert cfg["rope_scaling"] == params and cfg["rope_theta"] == theta


def test_byte_level_tokenizer_and_tokenizer_config(tmp_path):
    out, _, _ = convert(tmp_path, meta={"add_bos_token": True})
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    enc = tok.encode("<|im_start|>hello  world<think>1")  # add_bos_token: a second <|im_start|> in front
    assert enc.tokens == ["<|im_start|>", "<|im_start|>", "hello", "Ġ", "Ġworld", "<think>", "1"]
    assert tok.decode(enc.ids, skip_special_tokens=False) == "<|im_start|><|im_start|>hello  world<think>1"
    # "smollm" splits digits off first, so a space run before a digit stays one piece (as llama.cpp does)
    assert tok.encode("hello  1", add_special_tokens=False).tokens == ["hello", "ĠĠ", "1"]
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"] == TEMPLATE
    assert (config["bos_token"], config["eos_token"], config["add_bos_token"]) == ("<|im_start|>", "<|im_end|>", True)
    assert config["added_tokens_decoder"]["3"] == {"content": "<think>", "lstrip": False, "normalized": False,
                                                   "rstrip": False, "single_word": False, "special": False}
    assert config["added_tokens_decoder"]["2"]["special"] is True


def test_truncated_file_raises_one_sentence_naming_it(tmp_path):
    src = write_gguf(tmp_path / "tiny.gguf", hf_weights())
    data = src.read_bytes()
    for size in (0, 3, 40, 300, len(data) // 2, len(data) - 7):
        cut = tmp_path / f"cut{size}.gguf"
        cut.write_bytes(data[:size])
        with pytest.raises(LmforgeError, match=f"cut{size}.gguf"):
            convert_gguf(cut, tmp_path / f"out{size}", progress=False)
    with pytest.raises(LmforgeError, match="does not exist"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out", progress=False)


def test_unknown_architecture_is_named(tmp_path):
    src = write_gguf(tmp_path / "falcon.gguf", hf_weights(), arch="falcon")
    with pytest.raises(LmforgeError, match="'falcon' is not supported"):
        convert_gguf(src, tmp_path / "out", progress=False)


def test_unsupported_tensor_type_lists_supported(tmp_path):
    weights = hf_weights()
    weights["model.norm.weight"] = weights["model.norm.weight"].astype(np.float64)
    src = write_gguf(tmp_path / "f64.gguf", weights)
    with pytest.raises(LmforgeError, match=r"F64.*supported: F32, F16, BF16, Q8_0"):
        convert_gguf(src, tmp_path / "out", progress=False)


def test_missing_and_unknown_tensors_are_named(tmp_path):
    weights = hf_weights()
    del weights["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(LmforgeError, match="model.layers.1.mlp.up_proj.weight"):
        convert(tmp_path, weights)
    src = write_gguf(tmp_path / "extra.gguf", hf_weights(), extra_tensors={"blk.0.attn_q_norm.weight": np.ones(4)})
    with pytest.raises(LmforgeError, match="blk.0.attn_q_norm.weight"):
        convert_gguf(src, tmp_path / "out", progress=False)


# A SentencePiece-style vocabulary: <unk>, <s>, </s>, 256 byte pieces, then pieces best-merge first.
SPM_PIECES = ["▁", "t", "h", "e", "a", "c", "n", "i", "▁t", "he", "▁the", "at", "▁a", "▁c", "▁cat", "in", "▁in",
              "▁h", "▁hat", "▁▁", "s", "▁s", "▁sat"]
SPM_TOKENS = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *SPM_PIECES]
SPM_TOKENIZER = {"tokenizer_model": "llama", "tokenizer_pre": None, "token_list": SPM_TOKENS, "token_merges": None,
                 "token_types": [2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES), "unk_token_id": 0,
                 "token_scores": [0.0] * 259 + [-float(i) for i in range(len(SPM_PIECES))], "chat_template": None}


def test_sentencepiece_tokenizer_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    src = write_gguf(tmp_path / "spm.gguf", hf_weights(), meta=SPM_TOKENIZER)
    out = convert_gguf(src, tmp_path / "hf", progress=False)
    ours = Tokenizer.from_file(str(out / "tokenizer.json"))
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    for text in ["the cat sat in the hat", " the  cat", "héllo ☃\nthe", "<s>the</s> cat", "", "  "]:
        ids = ours.encode(text).ids
        assert ids == ref.encode(text), text
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert (config["add_bos_token"], config["bos_token"], config["unk_token"]) == (True, "<s>", "<unk>")


def test_named_chat_templates_become_hf_list(tmp_path):
    templates = [{"name": "default", "template": TEMPLATE}, {"name": "tool_use", "template": "{{ tools }}"}]
    out, _, _ = convert(tmp_path, meta={"chat_template": templates})
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == templates


@pytest.mark.parametrize("meta,message", [({"tokenizer_pre": "kimi-k2"}, "pre-tokenizer 'kimi-k2'"),
                                          ({"tokenizer_model": "bert"}, "tokenizer model 'bert'")])
def test_unsupported_tokenizer_fails_before_writing(tmp_path, meta, message):
    src = write_gguf(tmp_path / "tok.gguf", hf_weights(), meta=meta)
    with pytest.raises(LmforgeError, match=f"tok.gguf: {message}.* is not supported; supported: "):
        convert_gguf(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_missing_metadata_key_is_named(tmp_path):
    src = write_gguf(tmp_path / "nokey.gguf", hf_weights(), meta={"block_count": None})
    with pytest.raises(LmforgeError, match="nokey.gguf lacks the GGUF metadata key 'llama.block_count'"):
        convert_gguf(src, tmp_path / "out", progress=False)
