"""The book's small LM: corpus split, tokenizer, deterministic training, perplexity."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cohw_utils.studies.quantization import tinylm
from cohw_utils.core.errors import CohwError
from cohw_utils.studies.quantization.tinylm import TinyLMConfig


def test_corpus_split_is_by_file_every_tenth_in_sorted_order():
    c = tinylm.load_corpus(heldout_every=10, max_files=40)
    names = sorted(c.train_files + c.heldout_files)
    assert len(names) == 40 and not set(c.train_files) & set(c.heldout_files)
    assert list(c.heldout_files) == [names[i] for i in (9, 19, 29, 39)]
    assert list(c.train_files) == sorted(c.train_files)
    assert len(c.train_texts) == 36 and all(isinstance(t, str) and t for t in c.train_texts)
    assert c.sha256("train") == tinylm.load_corpus(heldout_every=10, max_files=40).sha256("train")
    assert "Python 3." in c.describe()
    with pytest.raises(CohwError, match="heldout_every"):
        tinylm.load_corpus(heldout_every=1)


def test_bpe_tokenizer_is_deterministic_and_round_trips():
    texts = tinylm.load_corpus(max_files=20).train_texts
    a = tinylm.train_tokenizer(texts, vocab_size=512)
    b = tinylm.train_tokenizer(texts, vocab_size=512)
    assert a.to_str() == b.to_str() and a.get_vocab_size() == 512
    assert a.token_to_id(tinylm.EOT) == 0
    sample = "def f(x):\n    return x ** 2  # é\n"
    assert a.decode(a.encode(sample).ids) == sample
    ids = tinylm.encode_text(a, ["ab", "cd"])
    assert ids.dtype == torch.long and (ids == 0).sum() == 2 and ids[-1] == 0


class _Uniform(nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids, **kw):
        return type("Out", (), {"logits": torch.zeros(*input_ids.shape, self.vocab)})()


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    windows = tinylm.eval_windows(torch.arange(100) % 7, seq_len=10)
    assert windows.shape == (10, 10)
    assert tinylm.perplexity(_Uniform(37), windows, batch=3) == pytest.approx(37)


def test_training_is_seeded_and_lowers_the_loss():
    cfg = TinyLMConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                       num_attention_heads=2, seq_len=32, batch=4, steps=12, warmup=2, lr=1e-2)
    ids = torch.arange(2000) % 50  # a perfectly predictable sequence
    m1, m2 = tinylm.make_model(cfg), tinylm.make_model(cfg)
    log1 = tinylm.train(m1, ids, cfg)
    log2 = tinylm.train(m2, ids, cfg)
    assert log1.losses == log2.losses                              # bitwise repeatable
    assert log1.losses[-1] < log1.losses[0] - 1.0
    assert log1.tokens == 12 * 4 * 32
    ppl = tinylm.perplexity(m1, tinylm.eval_windows(ids, 32, 4))
    assert 1 < ppl < math.exp(log1.losses[0])
    rate, timing = tinylm.decode_tokens_per_s(m1, ids[None, :8], new_tokens=3, repeats=2, warmup=0)
    assert rate > 0 and timing.repeats == 2


def test_paired_change_and_verdict():
    ref = torch.tensor([1.0, 1.2, 0.8, 1.1], dtype=torch.float64)
    # every window 0.1 nats worse: +10.52% with a zero-width interval -> "worse"
    d, lo, hi = tinylm.paired_change(ref, ref + 0.1)
    assert d == pytest.approx(100 * (math.exp(0.1) - 1)) and lo == pytest.approx(d) and hi == pytest.approx(d)
    assert tinylm.paired_verdict(lo, hi) == "worse"
    d, lo, hi = tinylm.paired_change(ref, ref - 0.05)
    assert d == pytest.approx(100 * (math.exp(-0.05) - 1)) and tinylm.paired_verdict(lo, hi) == "better"
    # differences +0.1, -0.1, +0.1, -0.1: mean 0, the interval straddles 0
    d, lo, hi = tinylm.paired_change(ref, ref + torch.tensor([0.1, -0.1, 0.1, -0.1], dtype=torch.float64))
    assert d == pytest.approx(0.0) and lo < 0 < hi and tinylm.paired_verdict(lo, hi) == "not resolved"
    assert tinylm.paired_verdict(float("nan"), float("nan")) == "not resolved"   # one window: no interval
    assert tinylm.paired_verdict(-0.5, 0.0) == "not resolved"                   # touching 0 is not resolved


def test_config_validation():
    with pytest.raises(CohwError, match="hidden_size"):
        TinyLMConfig(hidden_size=100, num_attention_heads=3)
    with pytest.raises(CohwError, match="steps"):
        TinyLMConfig(steps=0)
    with pytest.raises(CohwError, match="vocab_size"):
        tinylm.train_tokenizer(["abc"], vocab_size=100)
