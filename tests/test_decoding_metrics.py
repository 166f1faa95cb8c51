"""rep-n, diversity and isotropy against hand-computed values (Su et al. 2022 §5.1; Su & Collier 2023)."""

from __future__ import annotations

import math

import pytest
import torch

from align.eval import diversity, isotropy, rep_n


def test_rep_n_of_one_repeated_word():
    # 5 tokens: SimCTG counts 3 bigrams (L - n), all "a a": 1 unique; the correct count is 4 bigrams.
    assert rep_n(["a a a a a"], 2) == pytest.approx(100 * (1 - 1 / 3))
    assert rep_n(["a a a a a"], 2, simctg_count=False) == pytest.approx(100 * (1 - 1 / 4))
    assert rep_n(["a a a a a"], 4) == 0.0  # a single 4-gram under the SimCTG count
    assert rep_n(["a a a a a"], 4, simctg_count=False) == pytest.approx(50.0)


def test_all_distinct_ngrams_give_no_repetition():
    texts = ["the cat sat on a mat", "  one two three four five  "]
    for simctg_count in (True, False):
        for n in (2, 3, 4):
            assert rep_n(texts, n, simctg_count=simctg_count) == 0.0
        assert diversity(texts, simctg_count=simctg_count) == 1.0


def test_rep_n_pools_counts_over_the_corpus():
    texts = ["a a a a a", "a b c d e f"]
    # SimCTG bigrams: (1 unique of 3) + (4 unique of 4) = 5 of 7, not the mean of 66.7 % and 0 %.
    assert rep_n(texts, 2) == pytest.approx(100 * (1 - 5 / 7))
    assert rep_n(texts, 2, simctg_count=False) == pytest.approx(100 * (1 - 6 / 9))
    mean_of_texts = (rep_n(texts[:1], 2) + rep_n(texts[1:], 2)) / 2
    assert not math.isclose(rep_n(texts, 2), mean_of_texts)
    # Unique n-grams are counted per text: the same bigram in two texts counts twice.
    assert rep_n(["x y z", "x y z"], 2) == 0.0


def test_diversity_is_the_product_of_one_minus_rep_n():
    # SimCTG count: rep-2 = 1 - 1/3, rep-3 = 1 - 1/2, rep-4 = 0. Correct count: 1 - 1/4, 1 - 1/3, 1 - 1/2.
    assert diversity(["a a a a a"]) == pytest.approx(1 / 3 * 1 / 2 * 1)
    assert diversity(["a a a a a"], simctg_count=False) == pytest.approx(1 / 4 * 1 / 3 * 1 / 2)
    texts = ["a b a b a b c", "x y x y"]
    product = math.prod(1 - rep_n(texts, n) / 100 for n in (2, 3, 4))
    assert diversity(texts) == pytest.approx(product)


def test_rep_n_needs_an_ngram():
    with pytest.raises(ValueError, match="2-gram"):
        rep_n(["a a"], 2)  # 2 tokens: no bigram under the SimCTG count
    assert rep_n(["a a"], 2, simctg_count=False) == 0.0
    with pytest.raises(ValueError, match="n must be"):
        rep_n(["a b c"], 0)


def test_isotropy_of_identical_orthonormal_and_opposite_vectors():
    v = torch.tensor([0.3, -1.2, 2.0])
    assert isotropy([torch.stack([v, 2 * v, 0.5 * v])]) == pytest.approx(0.0, abs=1e-12)
    assert isotropy([torch.eye(4)]) == pytest.approx(1.0, abs=1e-12)
    assert isotropy([torch.stack([v, -v])]) == pytest.approx(2.0, abs=1e-12)


def test_isotropy_pools_pairs_and_ignores_single_token_sequences():
    identical = torch.ones(2, 3)  # 2 pairs, each cos 1
    orthonormal = torch.eye(3)  # 6 pairs, each cos 0
    pooled = isotropy([identical, orthonormal])
    assert pooled == pytest.approx(1 - 2 / 8)
    mean_of_sequences = (isotropy([identical]) + isotropy([orthonormal])) / 2
    assert mean_of_sequences == pytest.approx(0.5)
    assert isotropy([identical, orthonormal, torch.randn(1, 3)]) == pytest.approx(pooled)
    with pytest.raises(ValueError, match="two or more tokens"):
        isotropy([torch.randn(1, 3)])


def test_isotropy_matches_the_pairwise_definition():
    torch.manual_seed(0)
    sequences = [torch.randn(n, 6) + 1.5 for n in (2, 5, 7)]
    total, pairs = 0.0, 0
    for hidden in sequences:
        for i in range(len(hidden)):
            for j in range(len(hidden)):
                if i != j:
                    total += torch.nn.functional.cosine_similarity(hidden[i], hidden[j], dim=0).item()
                    pairs += 1
    assert isotropy(sequences) == pytest.approx(1 - total / pairs, abs=1e-6)
