"""NF4 weights: the levels, the round trip against a plain reference, memory, gradients, QLoRA training."""

import pytest
import torch

from lmforge.config.schema import LoraConfig
from lmforge.layers.linear import Linear
from lmforge.layers.lora import add_lora, set_submodule
from lmforge.layers.nf4 import NF4_LEVELS, NF4Linear
from tests.adapters import ours_logits, randomize_adapter, trainable
from tests.tiny import tiny_model

SEQS = [torch.tensor([3, 1, 4, 1, 5, 9, 2, 6]), torch.tensor([5, 3, 5, 8, 9, 7, 9, 3, 2, 3])]


def test_levels_are_the_normal_quantiles_of_the_qlora_paper():
    """QLoRA's construction: 8 positive and 7 negative quantiles of N(0, 1) (offset 0.9677083), zero, scaled by
    the largest to [-1, 1]."""
    offset, double = 0.9677083, torch.float64
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=double)[:-1])
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=double)[:-1])
    levels = torch.cat([negative, torch.zeros(1, dtype=double), positive]).sort().values
    torch.testing.assert_close(torch.tensor(NF4_LEVELS, dtype=double), levels / levels.abs().max(), atol=1e-6,
                               rtol=0)


def reference_dequantized(w: torch.Tensor) -> torch.Tensor:
    """Plain QLoRA math, written independently: nearest level (argmin) per absmax-normalised weight in blocks of
    64; the absmaxes minus their mean as int8 codes against 128 / absmax of each run of 256."""
    levels = torch.tensor(NF4_LEVELS)
    flat = w.float().flatten()
    blocks = torch.cat([flat, flat.new_zeros(-flat.numel() % 64)]).view(-1, 64)
    absmax = blocks.abs().amax(dim=1)
    nearest = (blocks[..., None] / absmax[:, None, None] - levels).abs().argmin(dim=-1)
    mean = absmax.mean()
    scales = []
    for run in (absmax - mean).split(256):
        factor = 128 / run.abs().max()
        scales.append((run * factor).round().clamp(-128, 127) / factor + mean)
    return (levels[nearest] * torch.cat(scales)[:, None]).flatten()[:w.numel()].view(w.shape)


@pytest.mark.parametrize("shape", [(256, 512), (48, 32), (7, 33)])  # 33 * 7: odd, not a whole block
def test_round_trip_matches_the_reference(shape):
    torch.manual_seed(0)
    linear = Linear(shape[1], shape[0])
    with torch.no_grad():
        linear.weight.normal_(0, 0.02)
        linear.weight[0, :5] = torch.tensor([0.3, -0.25, 0.0, 1e-4, -1e-4])  # outliers and near-zero values
    nf4 = NF4Linear.from_linear(linear)
    restored = nf4.dequantized(torch.float32)
    torch.testing.assert_close(restored, reference_dequantized(linear.weight), atol=1e-7, rtol=1e-6)
    relative = (restored - linear.weight).norm() / linear.weight.norm()
    assert 0.01 < relative < 0.2  # 4 bits lose something, not everything
    assert nf4.dequantized(torch.bfloat16).dtype == torch.bfloat16


def test_matches_torchao_when_installed():
    nf4tensor = pytest.importorskip("torchao.dtypes.nf4tensor")
    torch.manual_seed(0)
    w = torch.randn(256, 256, dtype=torch.bfloat16) * 0.02
    theirs = nf4tensor.to_nf4(w, 64, 256).get_original_weight().float()
    linear = Linear(256, 256, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(w)
    ours = NF4Linear.from_linear(linear).dequantized(torch.float32)
    torch.testing.assert_close(ours, theirs, atol=0.02 * w.abs().max().item(), rtol=0.02)  # torchao scales in bf16


def test_memory_is_about_half_a_byte_per_weight():
    nf4 = NF4Linear.from_linear(Linear(1024, 512, bias=False))
    stored = sum(b.numel() * b.element_size() for b in nf4.buffers())
    assert not list(nf4.parameters())  # no full-precision weight kept anywhere
    assert 0.5 < stored / (512 * 1024) < 0.52  # 0.5 + 1/64 (int8 scales) + 4/16384 (fp32 factors)


def test_forward_and_input_gradient_use_the_dequantized_weight_and_keep_it_out_of_autograd():
    torch.manual_seed(0)
    nf4 = NF4Linear.from_linear(Linear(64, 96))
    weight = nf4.dequantized(torch.float32)
    x = torch.randn(5, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        out = nf4(x)
    assert all(shape.numel() < weight.numel() for shape in saved)  # backward dequantises again
    torch.testing.assert_close(out, x @ weight.T + nf4.bias)
    grad = torch.randn_like(out)
    out.backward(grad)
    torch.testing.assert_close(x.grad, grad @ weight)
    assert nf4.bias.grad is None and not any(b.requires_grad for b in nf4.buffers())


def test_autocast_computes_in_bf16():
    nf4 = NF4Linear.from_linear(Linear(64, 32))
    x = torch.randn(3, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = nf4(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32


def test_qlora_gradients_equal_lora_on_the_dequantized_weights():
    """Through NF4Linear, LoRA gets exactly the gradients it would get on a plain Linear holding the same
    (dequantised) weight: the quantised base is only a storage format."""
    quantized = tiny_model()
    summary = add_lora(quantized, LoraConfig(target_modules="all-linear", dora=True), quantize=True)
    assert summary.quantized == 14 and isinstance(quantized.model.layers[0].mlp.down_proj.base_layer, NF4Linear)
    assert type(quantized.lm_head) is Linear  # QLoRA keeps the LM head (and embeddings, norms) in full precision
    randomize_adapter(quantized)
    plain = tiny_model()
    for path, module in quantized.named_modules():
        if isinstance(module, NF4Linear):
            linear = Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.weight.data = module.dequantized(torch.float32)
            set_submodule(plain, path.removesuffix(".base_layer"), linear)
    add_lora(plain, LoraConfig(target_modules="all-linear", dora=True))
    adapter = {k: v for k, v in quantized.state_dict().items() if ".lora_" in k}
    assert not plain.load_state_dict(adapter, strict=False).unexpected_keys
    for model in (quantized, plain):
        ours_logits(model, SEQS).logsumexp(-1).sum().backward()
    grads = {n: p.grad for n, p in trainable(plain).items()}
    assert grads.keys() == trainable(quantized).keys()
    for name, p in trainable(quantized).items():
        assert p.grad.abs().max() > 0, name
        torch.testing.assert_close(p.grad, grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_a_few_qlora_steps_lower_the_loss():
    model = tiny_model()
    add_lora(model, LoraConfig(rank=8, alpha=16, target_modules="all-linear"), quantize=True)
    optimizer = torch.optim.AdamW(trainable(model).values(), lr=1e-2)
    labels = torch.cat([s[1:] for s in SEQS] + [s[:1] for s in SEQS])  # any fixed targets
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.cross_entropy(ours_logits(model, SEQS), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0] and all(b < a for a, b in zip(losses[:-1], losses[1:], strict=True)), losses
