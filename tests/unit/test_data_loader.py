"""The loader: deterministic epochs, exact resumption from state_dict, disjoint rank shards."""

import numpy as np
import pytest

from lmforge.data import IGNORE_INDEX, Loader, build_datasets, micro_batches_per_epoch, steps_per_epoch
from lmforge.errors import LmforgeError
from tests.data_refs import chat, data_config, tiny_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("loader")
    tokenizer = tiny_tokenizer(tmp_path / "tok")
    rows = [chat(f"Question {i}?", f"Answer {i}.") for i in range(23)]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    return build_datasets(data_config(tmp_path, {"path": str(path), "format": "messages"}, packing=False), tokenizer)


def first_tokens(batch) -> list[int]:
    """The input ids of each document: identifies the samples (every sample's text differs)."""
    cu = batch.cu_seqlens.tolist()
    return [tuple(batch.input_ids[a:b].tolist()) for a, b in zip(cu[:-1], cu[1:], strict=True)]


def run(loader, n) -> list:
    out = []
    while len(out) < n:
        for batch in loader:
            out.append(first_tokens(batch))
            if len(out) == n:
                break
    return out


def test_resume_continues_with_exactly_the_next_micro_batch(datasets):
    reference = run(Loader(datasets.train, 4, seed=3), 15)  # 6 micro-batches per epoch: crosses two epochs
    for stop in (1, 5, 6, 7, 13):
        loader = Loader(datasets.train, 4, seed=3)
        assert run(loader, stop) == reference[:stop]
        state = loader.state_dict()
        resumed = Loader(datasets.train, 4, seed=3)
        resumed.load_state_dict(state)
        assert run(resumed, 15 - stop) == reference[stop:], stop


def test_epochs_are_shuffled_by_seed_and_epoch(datasets):
    def epoch_orders(seed, shuffle=True):
        loader = Loader(datasets.train, 4, seed=seed, shuffle=shuffle)
        return [loader.shard(e).tolist() for e in range(2)]

    a = epoch_orders(0)
    assert a == epoch_orders(0) and a[0] != a[1] and a != epoch_orders(1)
    assert sorted(a[0]) == list(range(23))
    assert epoch_orders(0, shuffle=False) == [list(range(23))] * 2


@pytest.mark.parametrize("world_size", [2, 3, 5])
def test_rank_shards_are_disjoint_cover_the_epoch_and_are_equally_long(datasets, world_size):
    loaders = [Loader(datasets.train, 2, seed=1, rank=r, world_size=world_size) for r in range(world_size)]
    shards = [loader.shard(0).tolist() for loader in loaders]
    assert len({len(s) for s in shards}) == 1 and len({len(loader) for loader in loaders}) == 1
    seen = [row for s in shards for row in s]
    assert set(seen) == set(range(23))
    padding = len(seen) - 23
    assert 0 <= padding < world_size  # the only repeats are the few rows that even out the shards
    batches = [[first_tokens(b) for b in loader] for loader in loaders]
    docs = [d for rank in batches for batch in rank for d in batch]
    assert len(docs) == len(seen) and len(set(docs)) == 23


def test_steps_per_epoch(datasets):
    assert micro_batches_per_epoch(23, 4) == 6 and steps_per_epoch(23, 4, 4) == 2
    assert micro_batches_per_epoch(23, 4, world_size=2) == 3 and steps_per_epoch(23, 2, 3, world_size=2) == 2
    loader = Loader(datasets.train, 4)
    assert len(loader) == 6 == len(list(loader)) and loader.steps_per_epoch(4) == 2


def test_a_state_from_other_data_or_an_uneven_split_is_refused(datasets):
    loader = Loader(datasets.train, 4, seed=3)
    run(loader, 1)  # 4 rows done
    with pytest.raises(LmforgeError, match="checkpoint's seed is 3, this run's is 4"):
        Loader(datasets.train, 4, seed=4).load_state_dict(loader.state_dict())
    with pytest.raises(LmforgeError, match="4 rows of epoch 0 were consumed, not a whole number of micro-batches "
                                           "of 4 rows on each of 2 processes"):
        Loader(datasets.train, 4, seed=3, rank=0, world_size=2).load_state_dict(loader.state_dict())


@pytest.mark.parametrize(("before", "after"), [(1, 2), (2, 1), (2, 4)])
def test_resume_with_another_world_size_continues_with_the_next_rows(datasets, before, after):
    """Rows of the epoch's order consumed by all ranks together, whatever the number of ranks: a run stopped
    after 2 rounds of micro-batches of 2 rows on `before` ranks continues at row 4 x before on `after` ranks."""
    order = Loader(datasets.train, 2, seed=5).shard(0).tolist()
    first = [Loader(datasets.train, 2, seed=5, rank=r, world_size=before) for r in range(before)]
    for loader in first:
        run(loader, 2)
    resumed = [Loader(datasets.train, 2, seed=5, rank=r, world_size=after) for r in range(after)]
    for loader in resumed:
        loader.load_state_dict(first[0].state_dict())
    rows = [loader.shard(0)[loader.position * 2:(loader.position + 1) * 2].tolist() for loader in resumed]
    done = 4 * before
    assert sorted(r for rank in rows for r in rank) == sorted(order[done:done + 2 * after])
    assert all(loader.state_dict() == first[0].state_dict() for loader in first)  # ranks agree on the position


def test_the_last_micro_batch_of_an_epoch_may_be_short(datasets):
    sizes = [len(b.cu_seqlens) - 1 for b in Loader(datasets.train, 4, shuffle=False)]
    assert sizes == [4, 4, 4, 4, 4, 3]
    assert np.array_equal(Loader(datasets.train, 4, shuffle=False).shard(0), np.arange(23))


def test_bad_arguments(datasets, tmp_path):
    with pytest.raises(ValueError, match="rank"):
        Loader(datasets.train, 4, rank=2, world_size=2)
    with pytest.raises(LmforgeError, match="the loader batches laid-out datasets"):
        Loader(datasets.train.samples, 4)


@pytest.mark.parametrize("packing", [True, False])
def test_preference_pairs_batch_as_two_documents_in_one_row(tmp_path, packing):
    """Each pair is prompt+chosen then the rejected answer, which attends to that prompt (it holds the prompt's
    last token and continues its positions), side by side in one flat batch; only the replies are trained, and a
    pair is never split between micro-batches."""
    tokenizer = tiny_tokenizer(tmp_path / "tok")
    rows = [{"prompt": f"Question {i}?" * (1 + i % 3), "chosen": f"Arr, answer {i}!", "rejected": f"Answer {i}."}
            for i in range(7)]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    cfg = data_config(tmp_path, {"path": str(path), "format": "preference"}).model_copy(update={"packing": packing})
    pairs = build_datasets(cfg, tokenizer).train
    assert pairs.num_rows == (len(pairs.rows) if packing else 7) and (packing or pairs.num_rows == 7)
    seen = []
    for batch in Loader(pairs, 2, seed=1):
        cu, prefixes = batch.cu_seqlens.tolist(), batch.prefix_lens.tolist()
        assert len(cu) % 2 == 1  # an even number of documents: whole pairs
        for start, middle, end in zip(cu[:-1:2], cu[1::2], cu[2::2], strict=True):
            chosen, rejected = batch.input_ids[start:middle].tolist(), batch.input_ids[middle:end].tolist()
            i = next(i for i, r in enumerate(rows) if r["chosen"] in tokenizer.decode(chosen))
            seen.append(i)
            prompt = pairs.pairs.prompt[i].tolist()
            shared = len(prompt) - 1
            assert chosen[:len(prompt)] == prompt and rejected[0] == prompt[-1]
            assert prefixes[cu.index(start)] == 0 and prefixes[cu.index(middle)] == shared
            assert tokenizer.decode(prompt + rejected[1:]) == tokenizer.decode(pairs.pairs.document(i, False)[0])
            for doc, reply, flags, skip in ((slice(start, middle), chosen[len(prompt):], pairs.pairs.chosen_trained,
                                             len(prompt) - 1), (slice(middle, end), rejected[1:],
                                                                pairs.pairs.rejected_trained, 0)):
                labels = batch.labels[doc]
                assert (labels[:skip] == IGNORE_INDEX).all()  # no prompt token is a target
                targets = labels[skip:-1]
                assert targets[targets != IGNORE_INDEX].tolist() == [t for t, f in zip(reply, flags[i], strict=True)
                                                                     if f]
            assert batch.positions[start].item() == 0 and batch.positions[middle].item() == shared
            assert batch.positions[end - 1].item() == shared + len(rejected) - 1
    assert sorted(seen) == list(range(7))
