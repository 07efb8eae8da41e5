"""Training data: sources -> formats -> chat templates with loss masks -> tokens (cached) -> packed flat batches.

    datasets = build_datasets(cfg.data, tokenizer, seed=cfg.seed)     # Datasets(train, validation, report)
    print(datasets.report)
    loader = Loader(datasets.train, cfg.micro_batch_size, seed=cfg.seed, shuffle=cfg.data.shuffle,
                    rank=rank, world_size=world_size)
    for batch in loader:                                              # one epoch (the rest of it, after a resume)
        hidden = model(batch.input_ids, batch.positions, AttnMeta.for_training(batch.cu_seqlens))
        ...                                                           # labels: the token to predict, or IGNORE_INDEX
    state = loader.state_dict()                                       # -> loader.load_state_dict(state)

Modules, in the order data flows through them: sources (files and Hugging Face datasets, rows with their origin),
formats (alpaca, messages, sharegpt, text, preference and unpaired kto rows), templates (chat templates and their
assistant spans), encode (tokens and trained flags), dataset (flat arrays), cache, packing, loader (Batch, state,
rank shards), report, build (build_datasets).
"""

from lmforge.data.build import Datasets, build_datasets
from lmforge.data.dataset import (
                                  IGNORE_INDEX,
                                  KTODataset,
                                  PairDataset,
                                  PreferenceDataset,
                                  Samples,
                                  SFTDataset,
                                  UnpairedPreferences,
)
from lmforge.data.loader import Batch, Loader, join_batches, make_batch, micro_batches_per_epoch, steps_per_epoch
from lmforge.data.report import DataReport, SplitReport
from lmforge.data.sources import Origin

__all__ = [
    "IGNORE_INDEX", "Batch", "join_batches", "DataReport", "Datasets", "KTODataset", "Loader", "Origin", "PairDataset",
    "PreferenceDataset", "SFTDataset", "Samples", "SplitReport", "UnpairedPreferences",
    "build_datasets", "make_batch", "micro_batches_per_epoch", "steps_per_epoch",
]
