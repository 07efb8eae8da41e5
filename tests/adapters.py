"""Helpers shared by the LoRA / PEFT tests: non-trivial adapter weights, PEFT's in-memory names, both forwards."""

import torch

from lmforge.layers.attention import AttnMeta


@torch.no_grad()
def randomize_adapter(model: torch.nn.Module, seed: int = 1) -> None:
    """Every trainable tensor away from its init (B = 0 would make any adapter the identity): LoRA factors
    random, DoRA magnitudes off their row norms by ~20%, modules_to_save perturbed."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        noise = torch.randn(p.shape, generator=gen).to(p)
        if name.endswith("lora_magnitude_vector"):
            p.mul_(1 + 0.2 * noise)
        elif ".lora_" in name:
            p.copy_(0.1 * noise)
        else:
            p.add_(0.05 * noise)


def peft_param_name(name: str, saved: tuple[str, ...] = ()) -> str:
    """lmforge's parameter name -> PEFT's name of the same tensor inside a PeftModel (adapter 'default')."""
    if name.endswith("lora_magnitude_vector"):
        return f"base_model.model.{name}.default.weight"
    module, _, param = name.rpartition(".")
    if module.endswith((".lora_A", ".lora_B")):
        return f"base_model.model.{module}.default.{param}"
    owner = next(path for path in saved if name.startswith(path + "."))
    return f"base_model.model.{owner}.modules_to_save.default.{name[len(owner) + 1:]}"


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def ours_logits(model: torch.nn.Module, seqs: list[torch.Tensor]) -> torch.Tensor:
    """lmforge's forward on one flat batch of the sequences."""
    ids = torch.cat(seqs)
    positions = torch.cat([torch.arange(len(s)) for s in seqs])
    return model.logits(model(ids, positions, AttnMeta.for_sequences([len(s) for s in seqs])))


def hf_logits(model: torch.nn.Module, seqs: list[torch.Tensor]) -> torch.Tensor:
    """transformers (or PEFT) on each sequence alone, rows concatenated."""
    return torch.cat([model(s[None]).logits[0].float() for s in seqs])


@torch.no_grad()
def save_peft_adapter(base_dir, out_dir, model_cls: str = "LlamaForCausalLM", seed: int = 1, scale: float = 0.1,
                      **lora_config):
    """A PEFT adapter made by PEFT itself (get_peft_model on the transformers model of base_dir), its A and B
    random (B nonzero, so it changes the outputs), saved to out_dir; returns the PEFT model (fp32, eval)."""
    import peft
    import transformers

    model = getattr(transformers, model_cls).from_pretrained(base_dir, dtype=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", **lora_config))
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            p.copy_(scale * torch.randn(p.shape, generator=gen))
    model.save_pretrained(out_dir)
    return model.eval()
