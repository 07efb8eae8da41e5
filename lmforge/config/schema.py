"""The training configuration: pydantic models, frozen, unknown keys rejected. Every field says what it does
(`lmforge config schema` prints them); recipes receive the validated object, never a dict."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelConfig(Section):
    path: str = Field("smollm2-135m", description="HF model directory, .gguf file, Hub id or alias (smollm2-135m)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype the weights are stored in during training; auto: float32 for trained weights "
                            "(full fine-tuning), bfloat16 for frozen ones (LoRA/QLoRA base)")


class LoraConfig(Section):
    rank: int = Field(8, ge=1, description="LoRA rank r")
    alpha: float = Field(16.0, gt=0, description="scaling numerator: the update is (alpha / r) * B @ A")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA branch's input")
    target_modules: list[str] | Literal["all-linear"] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="linear layers to adapt, by name (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
                    "down_proj), or all-linear (every linear layer except the LM head)")
    rslora: bool = Field(False, description="rank-stabilised scaling alpha / sqrt(r) instead of alpha / r")
    dora: bool = Field(False, description="weight-decomposed LoRA (DoRA): a trained magnitude per output row")
    modules_to_save: list[str] = Field([], description="modules trained in full beside the adapter (embed_tokens, "
                                                       "lm_head), saved in the adapter as PEFT does")


class DataSource(Section):
    path: str = Field(description="local .jsonl/.json/.parquet/.csv file, or a Hugging Face dataset id")
    format: Literal["alpaca", "messages", "sharegpt", "text", "preference", "kto", "prompt"] = Field(
        description="alpaca: instruction/input/output; messages: OpenAI-style role/content list; sharegpt: "
                    "conversations with from/value; text: raw text (continued pre-training); preference: "
                    "prompt/chosen/rejected; kto: TRL's unpaired preference rows prompt/completion/label (label "
                    "true: a desirable completion, false: an undesirable one), for preference.loss: kto; prompt: "
                    "prompt rows for recipe: grpo, a `prompt` (messages, rendered with the chat template, or a "
                    "string, used as it is) and any other columns, which the reward functions receive (e.g. answer)")
    split: str = Field("train", description="split of a Hugging Face dataset")
    subset: str | None = Field(None, description="configuration name of a Hugging Face dataset")
    field: str | None = Field(None, description="column holding the data when it is not the format's default "
                                                "(text, messages, conversations)")
    roles: dict[str, str] = Field({}, description="extra role names mapped to system/user/assistant "
                                                  "(ShareGPT's human/gpt/system are built in)")


class DataConfig(Section):
    train: list[DataSource] = Field(min_length=1, description="training data; several sources are concatenated")
    validation: list[DataSource] = Field([], description="validation data from its own files")
    val_fraction: float = Field(0.0, ge=0, lt=1, description="fraction of the training rows held out for "
                                                             "validation (when no validation files are given)")
    template: Literal["model", "chatml", "llama3", "mistral", "alpaca"] = Field(
        "model", description="prompt format: the model's own chat template, or a named one")
    train_on_inputs: bool = Field(False, description="also train on prompt tokens (default: only responses)")
    max_seq_len: int = Field(512, ge=8, description="tokens per sample (longer samples are truncated) and per "
                                                    "packed row")
    packing: bool = Field(True, description="pack samples into rows of max_seq_len; attention never crosses "
                                            "samples and positions restart in each")
    shuffle: bool = Field(True, description="shuffle the training samples (deterministically, from seed)")
    strict: bool = Field(False, description="fail on the first malformed row instead of skipping and counting")
    max_samples: int | None = Field(None, ge=1, description="use only the first N samples of the training data")
    cache_dir: str | None = Field(None, description="where tokenised datasets are cached (default "
                                                    "$LMFORGE_HOME/data)")


class OptimizerConfig(Section):
    name: Literal["adamw"] = "adamw"
    lr: float = Field(2e-4, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    implementation: Literal["auto", "fused", "foreach", "for-loop"] = Field(
        "auto", description="AdamW kernel: auto takes fused where the device supports it, else foreach")


class SchedulerConfig(Section):
    name: Literal["cosine", "linear", "constant"] = Field("cosine", description="decay after warm-up")
    warmup_steps: int = Field(0, ge=0, description="optimizer steps of linear warm-up from 0")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="floor of the decay, as a fraction of the peak lr")


class CheckpointConfig(Section):
    every_steps: int = Field(0, ge=0, description="save every N optimizer steps (0: only at the end)")
    keep_last: int = Field(2, ge=1, description="periodic checkpoints kept; older ones are deleted")
    resume: Literal["never", "auto"] | str = Field(
        "auto", description="auto: continue from the run directory's latest checkpoint when there is one; "
                            "never; or a checkpoint directory")


class EvalConfig(Section):
    every_steps: int = Field(0, ge=0, description="validation loss and perplexity every N steps (0: at the end "
                                                  "only, when there is validation data)")
    max_batches: int | None = Field(None, ge=1, description="validation micro-batches per evaluation (default all)")
    early_stopping_patience: int = Field(0, ge=0, description="stop after N evaluations without improvement of "
                                                              "val_loss (0: never)")


class LoggingConfig(Section):
    every_steps: int = Field(1, ge=1, description="write metrics every N optimizer steps")
    backends: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        [], description="extra metric sinks beside metrics.jsonl (each needs its package installed)")
    project: str = Field("lmforge", description="project / experiment name for wandb and mlflow")


class DistributedConfig(Section):
    strategy: Literal["auto", "ddp", "fsdp"] = Field(
        "auto", description="how several processes (torchrun, or lmforge train --nproc N) train together: ddp "
                            "replicates the model and averages gradients; fsdp shards it per decoder block "
                            "(FSDP2); auto: ddp when weights, gradients and optimizer state take at most half a "
                            "device, fsdp otherwise. Unused by a single process")
    shard: Literal["full", "grad_op"] = Field(
        "full", description="fsdp: full shards parameters, gradients and optimizer state, re-gathering a "
                            "block's weights for backward (ZeRO-3); grad_op keeps them gathered from forward to "
                            "backward (ZeRO-2: less communication, more memory)")
    cpu_offload: bool = Field(False, description="fsdp: sharded parameters, gradients and optimizer state live in "
                                                 "CPU memory and the optimizer steps there (FSDP2's "
                                                 "CPUOffloadPolicy)")


class PreferenceConfig(Section):
    loss: Literal["sigmoid", "ipo", "hinge", "robust", "simpo", "orpo", "kto"] = Field(
        "sigmoid", description="sigmoid: DPO; ipo; hinge: SLiC; robust: rDPO (label_smoothing = noise rate); simpo: "
                               "reference-free, length-normalised, margin simpo_gamma; orpo: odds ratio plus the "
                               "chosen answers' NLL, reference-free; kto: KTO on unpaired rows (format: kto), its "
                               "reference point the window's KL of mismatched prompt/completion rows (names and "
                               "formulas as TRL's)")
    beta: float = Field(0.1, gt=0, description="inverse temperature of the implicit reward (orpo: weight of the "
                                               "odds-ratio term)")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="robust and simpo: assumed rate of flipped labels")
    rpo_alpha: float = Field(0.0, ge=0, description="weight of an NLL term on the chosen answers (RPO; 0: none)")
    simpo_gamma: float = Field(0.5, description="simpo: target reward margin")
    desirable_weight: float = Field(1.0, gt=0, description="kto: weight of the desirable (label true) rows' losses")
    undesirable_weight: float = Field(1.0, gt=0, description="kto: weight of the undesirable (label false) rows' "
                                                             "losses")
    precompute_ref_log_probs: bool | None = Field(
        None, description="compute the reference model's log-probs of every training and validation pair once, "
                          "before the first step, and free the reference model (TRL's name); null: on for full "
                          "fine-tuning, whose reference is a frozen copy of the model (half its float32 bytes under "
                          "bf16-mixed), off for LoRA / QLoRA, whose reference (the base with adapters off) costs no "
                          "memory. Not with kto or the reference-free losses")

    @model_validator(mode="after")
    def _kto_weights(self) -> "PreferenceConfig":
        if self.loss != "kto" and (self.desirable_weight != 1.0 or self.undesirable_weight != 1.0):
            raise ValueError(f"preference.desirable_weight and undesirable_weight apply to loss: kto, not {self.loss}")
        if self.loss == "kto" and self.rpo_alpha:
            raise ValueError("preference.rpo_alpha does not apply to loss: kto")
        if self.precompute_ref_log_probs and self.loss in ("kto", "simpo", "orpo"):
            raise ValueError(f"preference.precompute_ref_log_probs does not apply to loss: {self.loss}")
        return self


class RewardConfig(Section):
    center_rewards_coefficient: float | None = Field(
        None, ge=0, description="weight of (chosen + rejected)^2 added to each pair's loss, which keeps the rewards "
                                "centred on 0 (Eisenstein et al. 2023; TRL's name); null: none")


class DistillConfig(Section):
    teacher: str | None = Field(None, description="the teacher model, resolved like model.path (HF directory, "
                                                  ".gguf file, Hub id or alias); it must share the student's "
                                                  "vocabulary")
    teacher_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype of the teacher's (frozen) weights; auto: bfloat16 under bf16-mixed, else "
                            "float32")
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = Field(
        "forward_kl", description="divergence between the teacher's (P) and the student's (Q) next-token "
                                  "distributions: forward_kl KL(P||Q) (supervised KD), reverse_kl KL(Q||P), jsd "
                                  "the generalized Jensen-Shannon divergence of GKD with weight beta on P")
    beta: float = Field(0.5, gt=0, lt=1, description="jsd: the mixture's weight on the teacher (TRL GKD's beta)")
    temperature: float = Field(1.0, gt=0, description="both distributions are softmax(logits / temperature)")
    kd_ratio: float = Field(0.5, ge=0, le=1, description="loss = kd_ratio x divergence + (1 - kd_ratio) x the "
                                                         "student's cross-entropy on the labels")


class RewardFunction(Section):
    name: str = Field(description="a built-in (exact_answer, regex_format, length_penalty, reward_model) or a Python "
                                  "callable by import path, package.module:function, called as TRL calls reward "
                                  "functions: f(prompts=, completions=, completion_ids=, **columns) -> a list of "
                                  "floats (None: not scorable)")
    weight: float = Field(1.0, description="weight of this function in the summed reward")
    args: dict = Field({}, description="keyword arguments bound to the function (a built-in's settings, e.g. "
                                       "regex_format's pattern)")


class GRPOConfig(Section):
    num_generations: int = Field(8, ge=2, description="completions sampled per prompt (G): each prompt's group")
    rollout_batch_size: int | None = Field(
        None, ge=2, description="completions sampled per rollout over all processes (a multiple of batch_size, "
                                "itself a multiple of num_generations: each optimizer step trains whole groups); "
                                "each rollout feeds rollout_batch_size / batch_size optimizer steps; null: "
                                "batch_size")
    max_completion_length: int = Field(256, ge=1, description="tokens sampled per completion at most")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the rollouts")
    top_p: float = Field(1.0, gt=0, le=1, description="rollouts' nucleus sampling")
    top_k: int = Field(0, ge=0, description="rollouts' top-k (0: off)")
    min_p: float = Field(0.0, ge=0, le=1, description="rollouts' min-p (0: off)")
    loss: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = Field(
        "dapo", description="grpo: each completion's token mean, averaged; dr_grpo: the token sum over completions x "
                            "max_completion_length; dapo: the token sum over the rollout's tokens per step; bnpo: "
                            "over the step's tokens (formulas as TRL's, train/grpo.py)")
    advantage: Literal["group", "rloo"] = Field(
        "group", description="baseline of a completion's reward: its group's mean (GRPO) or the mean of the others "
                             "(RLOO's leave-one-out)")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="divide advantages by the group's reward std, the rollout's, or not at all")
    beta: float = Field(0.0, ge=0, description="weight of the KL to the reference (the starting model: adapters off "
                                               "under LoRA, a frozen copy in full runs); 0: no reference pass")
    epsilon: float = Field(0.2, gt=0, description="lower clip of the importance ratio (1 - epsilon)")
    epsilon_high: float | None = Field(None, gt=0, description="upper clip (1 + epsilon_high; DAPO's clip-higher); "
                                                                "null: epsilon")
    delta: float | None = Field(None, gt=1, description="cap of the unclipped ratio (two-sided clipping); null: none")
    num_iterations: int = Field(1, ge=1, description="passes over each rollout (the ratio is clipped from the "
                                                     "second on)")
    kl_bias_correction: bool = Field(True, description="multiply the KL term by the importance ratio (TRL's "
                                                       "use_bias_correction_kl)")
    importance_sampling_mode: Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask",
                                      "none"] = Field(
        "token_truncate", description="correction for the sampler's probabilities differing from the trainer's: "
                                      "their ratio per token or per completion, truncated into [clip_min, clip_max] "
                                      "or masked to 0 outside it; none: no correction")
    importance_sampling_clip_min: float | None = Field(None, ge=0, description="lower bound of that ratio")
    importance_sampling_clip_max: float | None = Field(3.0, gt=0, description="upper bound of that ratio")
    rewards: list[RewardFunction] = Field(min_length=1, default_factory=lambda: [RewardFunction(name="exact_answer")],
                                          description="reward functions, summed with their weights")
    kv_cache_memory: float = Field(0.5, gt=0, description="GiB of KV cache for the rollout engine (freed while "
                                                          "training: the engine sleeps)")
    log_completions_every: int = Field(10, ge=0, description="write the rollout's prompts, completions and rewards to "
                                                             "completions.jsonl every N rollouts (0: never)")
    bitwise_logprobs: bool = Field(
        False, description="the rollout engine and the training forward run the same kernels in the same summation "
                           "order, so the sampler's log-probs of its tokens equal the trainer's bit for bit (the "
                           "importance ratio is then exactly the policy's); float32 on CPU with lmforge's kernels, "
                           "plain LoRA without dropout; slower (docs/training.md)")


class TrainConfig(Section):
    recipe: Literal["sft", "dpo", "reward", "distill", "grpo"] = Field(
        "sft", description="sft: next-token loss on the responses; dpo: preference optimisation on "
                           "prompt/chosen/rejected pairs, or unpaired prompt/completion/label rows with loss: "
                           "kto (loss and settings in the preference section; reference: "
                           "the starting model, the base with adapters off under LoRA, a frozen copy in full runs); "
                           "reward: a reward model (the decoder with a scalar head `score`, read at each answer's "
                           "last token) trained by the Bradley-Terry loss on the same pairs, saved as a Hugging "
                           "Face sequence-classification directory; distill: knowledge distillation from the "
                           "distill section's teacher on the responses of SFT-format data; grpo: online RL on "
                           "format: prompt rows, rollouts sampled by the in-process engine from the model being "
                           "trained and scored by the grpo section's reward functions")
    preference: PreferenceConfig = Field(PreferenceConfig(), description="recipe: dpo settings")
    reward: RewardConfig = Field(RewardConfig(), description="recipe: reward settings")
    distill: DistillConfig = Field(DistillConfig(), description="recipe: distill settings")
    grpo: GRPOConfig = Field(GRPOConfig(), description="recipe: grpo settings")
    model: ModelConfig = ModelConfig()
    method: Literal["full", "lora", "qlora"] = Field("lora", description="what is trained: every weight, a LoRA "
                                                                         "adapter, or an adapter over NF4 weights")
    lora: LoraConfig = LoraConfig()
    data: DataConfig
    optimizer: OptimizerConfig = OptimizerConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    eval: EvalConfig = EvalConfig()
    logging: LoggingConfig = LoggingConfig()
    output_dir: str = Field("runs/sft", description="the run directory: checkpoints, metrics, resolved config")
    seed: int = 42
    micro_batch_size: int = Field(4, ge=1, description="rows per forward (packed rows of max_seq_len, or "
                                                       "samples), in each process")
    batch_size: int = Field(8, ge=1, description="rows per optimizer step over all processes; gradient "
                                                 "accumulation = batch_size / (micro_batch_size x processes)")
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after N optimizer steps (overrides epochs)")
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip the gradient norm (null: no clipping)")
    precision: Literal["auto", "bf16-mixed", "fp16-mixed", "fp32"] = Field(
        "auto", description="compute dtype under autocast; weights and optimizer state stay float32 "
                            "(fp16-mixed adds loss scaling); auto: bf16-mixed where the device computes bf16 "
                            "natively, else fp32")
    activation_checkpointing: bool = Field(False, description="recompute blocks' activations in backward instead "
                                                              "of keeping them")
    activation_checkpointing_every: int = Field(1, ge=1, description="with activation_checkpointing: recompute "
                                                                     "every k-th block (1: all)")
    distributed: DistributedConfig = DistributedConfig()
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1, description="CPU threads (default: torch's choice)")

    @model_validator(mode="after")
    def _batch_divides(self) -> "TrainConfig":
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size "
                             f"({self.micro_batch_size})")
        return self

    @model_validator(mode="after")
    def _data_fits_recipe(self) -> "TrainConfig":
        sources = (*self.data.train, *self.data.validation)
        pairs = [s.format == "preference" for s in sources]
        unpaired = [s.format == "kto" for s in sources]
        prompts = [s.format == "prompt" for s in sources]
        if (self.recipe == "grpo") != all(prompts) or (self.recipe != "grpo" and any(prompts)):
            raise ValueError("recipe grpo samples its completions from prompt rows: every data source needs format: "
                             "prompt" if self.recipe == "grpo" else
                             f"format: prompt rows are for recipe: grpo, not {_recipe_name(self)}")
        if self.recipe != "grpo" and self.grpo != GRPOConfig():
            raise ValueError(f"the grpo section configures recipe: grpo, not {self.recipe}")
        if self.recipe == "grpo":
            _check_grpo(self)
        if self.recipe == "dpo" and self.preference.loss == "kto":
            if not all(unpaired):
                raise ValueError("preference.loss kto trains on unpaired rows: every data source needs format: kto "
                                 "(prompt, completion, label), not format: preference pairs or SFT rows")
        elif any(unpaired):
            raise ValueError("format: kto rows are unpaired (prompt, completion, label) and train only recipe: dpo "
                             f"with preference.loss: kto, not {_recipe_name(self)}")
        elif self.recipe in ("dpo", "reward") and not all(pairs):
            raise ValueError(f"recipe {self.recipe} trains on preference pairs: every data source needs format: "
                             "preference")
        if self.recipe == "sft" and any(pairs):
            raise ValueError("format: preference rows are pairs for recipe: dpo or reward, not sft; set recipe: dpo "
                             "or recipe: reward")
        if self.recipe == "distill" and any(pairs):
            raise ValueError("recipe distill trains on SFT-format data (messages, alpaca, sharegpt or text), not on "
                             "format: preference pairs")
        if self.recipe != "dpo" and self.preference != PreferenceConfig():
            raise ValueError(f"the preference section configures recipe: dpo, not {self.recipe}")
        if self.recipe == "reward" and self.distributed.strategy == "fsdp":
            raise ValueError("recipe reward trains in one process or several under distributed.strategy ddp (saving "
                             "a reward model does not gather FSDP shards yet); set distributed.strategy: ddp")
        if self.recipe != "reward" and self.reward != RewardConfig():
            raise ValueError(f"the reward section configures recipe: reward, not {self.recipe}")
        if self.recipe == "distill" and self.distill.teacher is None:
            raise ValueError("recipe distill needs a teacher: set distill.teacher to a model directory, .gguf file, "
                             "Hub id or alias")
        if self.recipe != "distill" and self.distill != DistillConfig():
            raise ValueError(f"the distill section configures recipe: distill, not {self.recipe}")
        return self

    def on_device(self, device) -> "TrainConfig":
        """This config with `precision: auto` resolved for the device (a torch.device) the run uses
        (lmforge/hardware.py); bf16-mixed forced on a CPU that emulates bf16 is warned about once."""
        import torch

        from lmforge.hardware import auto_precision, warn_if_emulated

        if self.precision != "auto":
            if self.precision == "bf16-mixed":
                warn_if_emulated(torch.bfloat16, device.type)
            return self
        bitwise = self.recipe == "grpo" and self.grpo.bitwise_logprobs  # float32 on the shared kernels
        return self.model_copy(update={"precision": "fp32" if bitwise else auto_precision(device)})

    def grad_accumulation(self, world_size: int = 1) -> int:
        """Micro-batches per process and optimizer step, so that every step sees batch_size rows in all."""
        per_step = self.micro_batch_size * world_size
        if self.batch_size % per_step:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size x processes "
                             f"({self.micro_batch_size} x {world_size})")
        return self.batch_size // per_step


def _check_grpo(cfg: TrainConfig) -> None:
    g = cfg.grpo
    rollout = g.rollout_batch_size or cfg.batch_size
    if cfg.batch_size % g.num_generations or rollout % cfg.batch_size:
        raise ValueError(f"batch_size ({cfg.batch_size}) must be a multiple of grpo.num_generations "
                         f"({g.num_generations}) (an optimizer step trains whole groups) and grpo.rollout_batch_size "
                         f"({rollout}) a multiple of batch_size")
    if g.delta is not None and g.delta <= 1 + (g.epsilon if g.epsilon_high is None else g.epsilon_high):
        raise ValueError(f"grpo.delta ({g.delta}) must exceed 1 + epsilon_high")
    if cfg.data.max_seq_len <= g.max_completion_length:
        raise ValueError(f"data.max_seq_len ({cfg.data.max_seq_len}) holds prompt and completion: it must exceed "
                         f"grpo.max_completion_length ({g.max_completion_length})")
    if cfg.distributed.strategy == "fsdp":
        raise ValueError("recipe grpo trains in one process or several under distributed.strategy ddp (each rank's "
                         "rollout engine needs whole weights); set distributed.strategy: ddp")
    if g.bitwise_logprobs:
        if cfg.precision not in ("auto", "fp32") or cfg.model.dtype not in ("auto", "float32") or \
                cfg.device == "cuda" or cfg.method == "qlora":
            raise ValueError("grpo.bitwise_logprobs runs float32 on lmforge's CPU kernels: it needs precision fp32 "
                             "(or auto), model.dtype float32 (or auto), device cpu (or auto) and method lora or full")
        if cfg.method == "lora" and (cfg.lora.dropout or cfg.lora.dora):
            raise ValueError("grpo.bitwise_logprobs needs lora.dropout 0 (dropout makes the training forward differ "
                             "from the policy the engine samples) and plain LoRA (DoRA's row norms are not on the "
                             "shared kernels)")
    if cfg.data.val_fraction:
        raise ValueError("recipe grpo scores held-out prompts from data.validation files (greedy completions, "
                         "val_reward); data.val_fraction is not supported for it")


def _recipe_name(cfg: TrainConfig) -> str:
    return f"recipe: dpo with loss: {cfg.preference.loss}" if cfg.recipe == "dpo" else f"recipe: {cfg.recipe}"
