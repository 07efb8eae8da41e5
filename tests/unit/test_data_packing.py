"""Packing and the flat batch layout: documents keep their boundaries, positions and labels never cross them."""

import numpy as np
import pytest
import torch

from lmforge.data import IGNORE_INDEX, build_datasets, make_batch
from lmforge.data.packing import efficiency, one_per_row, pack
from lmforge.layers.attention import AttnMeta
from tests.data_refs import chat, data_config, tiny_tokenizer, write_jsonl
from tests.tiny import tiny_model


@pytest.mark.parametrize("seed", range(5))
def test_pack_places_every_sample_once_within_the_row_budget(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 129, size=300)
    rows = pack(lengths, 128)
    assert sorted(rows.samples.tolist()) == list(range(300))
    assert all(lengths[rows[r]].sum() <= 128 for r in range(len(rows)))
    lower_bound = int(np.ceil(lengths.sum() / 128))
    assert len(rows) <= lower_bound * 1.1 + 1  # best-fit decreasing is near the optimum on such lengths
    assert efficiency(lengths, rows, 128) == pytest.approx(lengths.sum() / (len(rows) * 128))
    again = pack(lengths, 128)
    assert np.array_equal(again.samples, rows.samples) and np.array_equal(again.offsets, rows.offsets)


def test_pack_fills_exact_fits_and_refuses_oversized_samples():
    rows = pack(np.array([60, 40, 68, 32, 100]), 100)
    assert sorted(sorted(rows[r].tolist()) for r in range(len(rows))) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError, match="does not fit"):
        pack(np.array([101]), 100)
    assert len(one_per_row(4)) == 4 and one_per_row(4)[2].tolist() == [2]


@pytest.fixture
def packed(tmp_path):
    tokenizer = tiny_tokenizer(tmp_path / "tok")
    rows = [chat(f"Question number {i}?", "Arr! " + "matey " * (i % 7)) for i in range(30)]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    return build_datasets(data_config(tmp_path, {"path": str(path), "format": "messages"}, max_seq_len=256), tokenizer)


def test_a_flat_batch_keeps_documents_apart(packed):
    dataset = packed.train
    assert dataset.num_rows < len(dataset)  # several samples share rows
    batch = make_batch(dataset, np.arange(3))
    cu = batch.cu_seqlens.tolist()
    samples = [int(s) for r in range(3) for s in dataset.rows[r]]
    assert batch.cu_seqlens.dtype == torch.int32 and cu[0] == 0 and cu[-1] == batch.num_tokens
    assert len(cu) == len(samples) + 1
    for doc, sample in enumerate(samples):
        start, end = cu[doc], cu[doc + 1]
        ids, labels = batch.input_ids[start:end], batch.labels[start:end]
        assert ids.tolist() == dataset.samples.tokens[sample].tolist()
        assert batch.positions[start:end].tolist() == list(range(end - start))  # restart in each document
        # labels[i] is the next token of the same document, where that token is trained
        trained = torch.from_numpy(dataset.samples.trained[sample].copy())
        expected = torch.where(trained[1:], ids[1:], IGNORE_INDEX)
        assert labels[:-1].tolist() == expected.tolist()
        assert labels[-1] == IGNORE_INDEX  # the last token predicts nothing: no label crosses into the next doc
    assert batch.num_trained_tokens == int((batch.labels != IGNORE_INDEX).sum()) > 0
    rows_tokens = [sum(len(dataset.samples.tokens[s]) for s in dataset.rows[r]) for r in range(3)]
    assert batch.num_tokens == sum(rows_tokens) and max(rows_tokens) <= 256


def test_the_model_sees_packed_documents_as_if_alone(packed):
    dataset = packed.train
    model = tiny_model().eval()
    batch = make_batch(dataset, np.arange(2))
    ids = batch.input_ids % 96  # the tiny model's vocabulary
    with torch.no_grad():
        together = model(ids, batch.positions, AttnMeta.for_training(batch.cu_seqlens))
        cu = batch.cu_seqlens.tolist()
        for start, end in zip(cu[:-1], cu[1:], strict=True):
            alone = model(ids[start:end], torch.arange(end - start),
                          AttnMeta.for_training(torch.tensor([0, end - start], dtype=torch.int32)))
            torch.testing.assert_close(together[start:end], alone, atol=1e-5, rtol=1e-5)


def test_without_packing_each_sample_is_its_own_row(tmp_path, packed):
    tokenizer = tiny_tokenizer(tmp_path / "tok2")
    path = write_jsonl(tmp_path / "rows.jsonl", [chat("Hi", "Ahoy"), chat("Bye", "Fair winds")])
    datasets = build_datasets(data_config(tmp_path, {"path": str(path), "format": "messages"}, packing=False),
                              tokenizer)
    assert datasets.train.num_rows == 2
    batch = make_batch(datasets.train, np.array([1, 0]))
    lengths = datasets.train.lengths
    assert batch.cu_seqlens.tolist() == [0, lengths[1], lengths[1] + lengths[0]]
    report = datasets.report.train
    assert report.rows == 2 and report.packing_efficiency == pytest.approx(lengths.sum() / (2 * 512))
    assert report.trained_fraction == pytest.approx(report.trained_tokens / report.tokens)
