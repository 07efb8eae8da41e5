"""KTO in 2 gloo processes (`lmforge train --nproc 2`, DDP and FSDP) against one process, on a tiny random Llama with
SmolLM2's tokenizer (tests/unit/test_kto.py has the single-process tests and the unpaired rows)."""

import pytest

from tests.train_refs import metrics
from tests.unit.test_kto import kto_maker
from tests.unit.test_train_distributed import assert_two_processes_match_one


@pytest.mark.parametrize(("strategy", "method"), [("ddp", "lora"), ("fsdp", "full")])
def test_kto_in_two_processes_reaches_the_single_process_losses(tmp_path, tiny_chat_model, strategy, method):
    """z0 from the KL documents of both ranks' micro-batches and rows counted over both ranks: the losses, metrics
    and validation of 2 gloo processes equal one process's (5 validation rows of both labels: one rank runs a
    filler row). Training on desirable rows only makes every completion likelier, so z0 is positive (not clamped)."""
    make = kto_maker(tmp_path, tiny_chat_model, slice(0, 64, 2), slice(32, 37), method=method, data__packing=False,
                     micro_batch_size=1, batch_size=4, max_steps=4, threads=1, eval__every_steps=4,
                     optimizer__lr=3e-3)
    assert_two_processes_match_one(make, strategy, ("loss", "kl", "rewards/", "logps/", "val_"))
    records = metrics(tmp_path / "single")
    assert all(r["kl"] > 0 for r in records[1:4]) and records[4]["val_kl"] > 0
    assert "val_rewards/margins" in records[4]
