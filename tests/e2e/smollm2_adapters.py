"""Two PEFT LoRA adapters on the real SmolLM2 (made by PEFT, random nonzero A and B) and PEFT's merged reference
generations (fp32, transformers' greedy generate), shared by the multi-LoRA engine and server tests."""

from pathlib import Path

import torch

from tests.adapters import save_peft_adapter

NEW_TOKENS = 16
QUESTIONS = ["Name a planet.", "What is 2 + 2?", "Say something kind.", "Name a colour.", "What is a cat?",
             "Give me a fruit."]
# rank 8 on q/v (PEFT's usual choice), and rank 16 rsLoRA on every linear layer: different ranks, scalings, targets
ADAPTERS = {
    "pirate": dict(seed=11, scale=0.07, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "poet": dict(seed=12, scale=0.03, r=16, lora_alpha=16, target_modules="all-linear", use_rslora=True),
}


def chat_prompt(tokenizer, question: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=True)


def make_adapters(smollm2_dir: Path, out: Path) -> dict[str, Path]:
    """Writes both adapters under out; returns their directories by name."""
    for name, cfg in ADAPTERS.items():
        save_peft_adapter(smollm2_dir, out / name, **cfg)
    return {name: out / name for name in ADAPTERS}


@torch.no_grad()
def peft_references(smollm2_dir: Path, adapters: dict[str, Path], prompts: list[list[int]]) \
        -> dict[str | None, list[list[int]]]:
    """Greedy NEW_TOKENS per prompt (through EOS, as ignore_eos) of the base model and of each adapter merged into
    it by PEFT's merge_and_unload, all in fp32."""
    import peft
    import transformers

    out = {}
    for name in (None, *adapters):
        model = transformers.LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
        if name is not None:
            model = peft.PeftModel.from_pretrained(model, adapters[name]).merge_and_unload()
        model.eval().generation_config.eos_token_id = None
        out[name] = [model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                    pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    return out
