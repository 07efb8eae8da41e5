"""A reward model on SmolLM2-135M-Instruct saved as a sequence-classification directory: transformers' own
tokenizer and AutoModelForSequenceClassification, on a padded batch, reproduce lmforge's packed scores (fp32)."""

import json

import torch

from lmforge.layers.attention import AttnMeta
from lmforge.models import build_model
from lmforge.train.reward import load_reward_model, reward_model_from, save_reward_model

CHATS = [
    [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Ahoy, matey!"}],
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "The capital of France is Paris, a city on the Seine."}],
]


def test_transformers_reproduces_smollm2_reward_scores(smollm2_dir, tmp_path):
    import transformers

    model = reward_model_from(build_model(smollm2_dir, torch.float32, progress=False), seed=0).eval()
    assert model.pad_token_id == 2  # the config's pad token (<|im_end|>, also EOS)
    save_reward_model(model, tmp_path / "rm", source_dir=smollm2_dir)
    assert json.loads((tmp_path / "rm" / "config.json").read_text())["architectures"] == [
        "LlamaForSequenceClassification"]

    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "rm", padding_side="right")
    texts = [tokenizer.apply_chat_template(chat, tokenize=False) for chat in CHATS]
    texts.append("Plain text that ends in the pad token<|im_end|>")  # scored at the token before it, by both
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm", dtype=torch.float32)
    with torch.no_grad():
        theirs = hf.eval()(**batch).logits[:, 0]

    docs = [ids[mask.bool()] for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)]
    assert docs[-1][-1] == 2 and docs[0][-1] != 2
    ids = torch.cat(docs)
    positions = torch.cat([torch.arange(len(d)) for d in docs])
    meta = AttnMeta.for_sequences([len(d) for d in docs])
    with torch.no_grad():
        ours = model(ids, positions, meta)
        loaded = load_reward_model(tmp_path / "rm")(ids, positions, meta)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    assert torch.equal(loaded, ours)
