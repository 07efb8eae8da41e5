"""Reward models: a decoder with a scalar head read at each document's last token, the Bradley-Terry loss on
preference pairs, and the Hugging Face sequence-classification directory they are saved as. Pieces for a training
loop, an evaluator or an RL recipe; the loop itself lives elsewhere.

    model = reward_model_from(build_model(path, torch.float32), pad_token_id=tokenizer.pad_token_id)
    scores = model(input_ids, positions, AttnMeta.for_training(cu_seqlens))  # [docs], chosen and rejected
    loss = bradley_terry_loss(scores[0::2], scores[1::2]).mean()
    save_reward_model(model, out_dir, source_dir=path)  # AutoModelForSequenceClassification loads out_dir
    model = load_reward_model(out_dir)

Which token is scored: transformers' `*ForSequenceClassification` takes the rightmost token that is not
`pad_token_id` (so left and right padding give the same score); lmforge takes, within each document of a flat
batch, the same token, so a document that ends in the pad token (often EOS) is scored where transformers scores it.
The loss and metrics are TRL 1.16's RewardTrainer.compute_loss (tests/unit/test_reward.py calls TRL's method).
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.layers.attention import AttnMeta
from lmforge.layers.lora import lora_layers
from lmforge.layers.nf4 import NF4Linear
from lmforge.models import ARCHITECTURES, allocate, build_on_meta, resolve_dtype
from lmforge.models.config import read_config
from lmforge.weights.hf_dir import load_weights, save_state_dict, write_side_files

CAUSAL, SEQ_CLS = "ForCausalLM", "ForSequenceClassification"


class RewardModel(nn.Module):
    """A family's decoder trunk (`model.`, HF names) and `score`, a bias-free linear map to one number: parameter
    names are exactly those of transformers' `<Family>ForSequenceClassification`. `config` is its HF config."""

    def __init__(self, decoder: nn.Module, config: dict):
        super().__init__()
        self.model = decoder
        self.config = config
        self.pad_token_id: int | None = config.get("pad_token_id")
        embed = decoder.embed_tokens.weight
        self.score = nn.Linear(embed.shape[1], 1, bias=False, device=embed.device, dtype=embed.dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttnMeta) -> torch.Tensor:
        """input_ids, positions [T] of a flat batch of documents (meta.cu_seqlens_q) -> float32 scores [docs]."""
        hidden = self.model(input_ids, positions, meta, None)
        return self.scores(hidden, input_ids, meta.cu_seqlens_q)

    def scores(self, hidden: torch.Tensor, input_ids: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """The head on each document's scored token (see the module docstring): hidden [T, H] -> float32 [docs]."""
        rows = scored_tokens(input_ids, cu_seqlens, self.pad_token_id)
        last = hidden.index_select(0, rows)
        return self.score(last.to(self.score.weight.dtype)).float().squeeze(-1)

    @torch.no_grad()
    def init_score(self, seed: int = 0) -> None:
        """transformers' init of a new head: normal(0, initializer_range), here from a seeded generator."""
        weight = self.score.weight
        gen = torch.Generator(device=weight.device).manual_seed(seed)
        std = self.config.get("initializer_range", 0.02)
        weight.copy_(torch.normal(0.0, std, weight.shape, generator=gen, device=weight.device))


def scored_tokens(input_ids: torch.Tensor, cu_seqlens: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """Row in the flat batch of each document's last token that is not pad_token_id (its first token if all are;
    its last token if pad_token_id is None), as transformers' sequence classifiers choose it."""
    cu_seqlens = cu_seqlens.to(device=input_ids.device, dtype=torch.long)
    if int(cu_seqlens[-1]) != len(input_ids):
        raise ValueError(f"cu_seqlens covers {int(cu_seqlens[-1])} tokens, but the batch has {len(input_ids)}")
    starts, lens = cu_seqlens[:-1], cu_seqlens[1:] - cu_seqlens[:-1]
    if bool((lens <= 0).any()):
        raise ValueError("every document needs at least one token; cu_seqlens has an empty one")
    if pad_token_id is None:
        return cu_seqlens[1:] - 1
    doc = torch.repeat_interleave(torch.arange(len(lens), device=input_ids.device), lens)
    rows = torch.arange(len(input_ids), device=input_ids.device)
    candidates = torch.where(input_ids != pad_token_id, rows, starts[doc])
    return starts.clone().scatter_reduce(0, doc, candidates, "amax")


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                       center_rewards_coefficient: float | None = None) -> torch.Tensor:
    """Per-pair -log sigmoid(chosen - rejected - margin) (Bradley-Terry; the margin as in Llama 2's reward model),
    plus center_rewards_coefficient * (chosen + rejected)^2 (Eisenstein et al. 2023, eq. 2) when set. The mean over
    pairs is TRL's RewardTrainer loss."""
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff)
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * (chosen + rejected) ** 2
    return loss


def accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Per pair, 1.0 where the chosen answer scores strictly higher (TRL's `accuracy` is its mean)."""
    return (chosen > rejected).float()


def reward_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """One batch's metrics under TRL's names (its RewardTrainer averages them over the logging interval)."""
    both = torch.cat([chosen, rejected]).detach()
    return {"min_reward": both.min().item(), "mean_reward": both.mean().item(), "max_reward": both.max().item(),
            "accuracy": accuracy(chosen, rejected).mean().item(), "margin": (chosen - rejected).mean().item()}


def reward_config(causal_config: dict, pad_token_id: int | None) -> dict:
    """The sequence-classification config of a causal LM's: the family's classifier, one label, the pad token."""
    archs = [a for a in causal_config.get("architectures") or [] if a in ARCHITECTURES and a.endswith(CAUSAL)]
    if not archs:
        raise LmforgeError(f"architectures {causal_config.get('architectures')} name no causal LM lmforge can "
                           f"turn into a reward model ({', '.join(ARCHITECTURES)})")
    return {**causal_config, "architectures": [archs[0].removesuffix(CAUSAL) + SEQ_CLS], "num_labels": 1,
            "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}, "pad_token_id": pad_token_id}


def reward_model_from(model: nn.Module, pad_token_id: int | None = None, seed: int = 0) -> RewardModel:
    """A reward model on `model`'s trunk (a causal LM from build_model; its lm_head is dropped) with a new head.

    pad_token_id: the token transformers skips when it looks for the last token; by default the config's
    pad_token_id, else its eos_token_id. Choose one that does not end the documents (else both transformers and
    lmforge score the token before it)."""
    config = model.config
    if pad_token_id is None:
        pad_token_id = config.get("pad_token_id")
    if pad_token_id is None:
        eos = config.get("eos_token_id")
        pad_token_id = eos[0] if isinstance(eos, list) and eos else eos
    reward = RewardModel(model.model, reward_config(config, pad_token_id))
    reward.init_score(seed)
    return reward.train(model.training)


@torch.no_grad()
def reward_state_dict(model: RewardModel, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tensor under HF names, on the CPU, in `dtype` (default: the trunk's, `model.norm`). LoRA layers are
    merged into their base weights (each computed in float32, rounded once) without changing the model, and NF4
    (QLoRA) weights dequantised first, so the saved model computes what was trained. Needs the whole model in this
    process (under FSDP, gather it first)."""
    dtype = dtype or model.model.norm.weight.dtype
    state, done = {}, []
    for path, layer in lora_layers(model).items():
        state[f"{path}.weight"] = merged_weight(layer)
        if layer.base_layer.bias is not None:
            state[f"{path}.bias"] = layer.base_layer.bias.detach()
        done.append(path)
    for path, layer in model.named_modules():
        if isinstance(layer, NF4Linear) and not any(path.startswith(p + ".") for p in done):
            state[f"{path}.weight"] = layer.dequantized(torch.float32)
            if layer.bias is not None:
                state[f"{path}.bias"] = layer.bias.detach()
            done.append(path)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:  # tied weights once, as HF saves them
        if not any(name.startswith(p + ".") for p in done):
            state[name] = t.detach()
    return {n: t.to(device="cpu", dtype=dtype).contiguous() for n, t in state.items()}


def merged_weight(layer: nn.Module) -> torch.Tensor:
    """LoRALinear.merge's weight in float32, computed aside (the model keeps training): base + scaling * B @ A,
    rows rescaled to the trained magnitudes for DoRA; an NF4 base is dequantised first."""
    weight = layer.base_weight(torch.float32) + layer.delta_weight()
    if layer.dora:
        weight *= (layer.lora_magnitude_vector.float() / torch.linalg.vector_norm(weight, dim=1))[:, None]
    return weight.detach()


def save_reward_model(model: RewardModel, out_dir: str | Path, source_dir: str | Path | None = None,
                      dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes a Hugging Face sequence-classification directory at out_dir: weights under HF names (`model.*`,
    `score.weight`; a LoRA or QLoRA adapter merged in, see reward_state_dict), config.json naming the family's
    `*ForSequenceClassification` with num_labels 1 and pad_token_id, and source_dir's tokenizer files."""
    out_dir = Path(out_dir)
    state = reward_state_dict(model, dtype)
    save_state_dict(state, out_dir, max_shard_bytes)
    write_side_files(model.config, out_dir, next(iter(state.values())).dtype, source_dir)


def load_reward_model(model_dir: str | Path, dtype: str | torch.dtype = "auto",
                      device: str | torch.device = "cpu") -> RewardModel:
    """Reads a sequence-classification directory (save_reward_model's, or one transformers wrote for a family lmforge
    runs) into a RewardModel in eval mode."""
    model_dir = Path(model_dir)
    where = str(model_dir / "config.json")
    config = read_config(model_dir)
    archs = [a for a in config.get("architectures") or [] if a.endswith(SEQ_CLS)]
    causal = [a.removesuffix(SEQ_CLS) + CAUSAL for a in archs if a.removesuffix(SEQ_CLS) + CAUSAL in ARCHITECTURES]
    if not causal:
        raise LmforgeError(f"{where}: architectures {config.get('architectures')} name no sequence-classification "
                           f"(reward) model of a family lmforge runs; expected one of "
                           f"{', '.join(a.removesuffix(CAUSAL) + SEQ_CLS for a in ARCHITECTURES)}")
    labels = config.get("num_labels") or len(config.get("id2label") or {0: ""})
    if labels != 1:
        raise LmforgeError(f"{where}: the model has {labels} labels; a reward model has one (num_labels: 1)")
    base, _ = build_on_meta({**config, "architectures": causal[:1]}, where, resolve_dtype(dtype, config, device))
    with torch.device("meta"):
        model = RewardModel(base.model, config)
    model = allocate(model, device)
    load_weights(model, model_dir, progress=False)
    return model.eval()
