"""Degeneration metrics of open-ended generation: rep-n, diversity (SimCTG) and isotropy (Su & Collier, TMLR 2023).

Definitions follow SimCTG (Su et al. 2022, "A Contrastive Framework for Neural Text Generation", §5.1 and the
isotropy of §2/Eq. 1 in Su & Collier 2023) and its evaluation code:

* rep-n and diversity are pooled over the corpus: the per-text counts of unique and of all n-grams are summed first,
  so a long text weighs more than a short one (SimCTG ``simctg/evaluation.py::measure_repetition_and_diversity``).
* Texts are split on whitespace.
* SimCTG's loop ``while end_idx < len(tokens)`` drops the last n-gram: a text of L tokens yields L - n n-grams, not
  L - n + 1. That count is the default (``simctg_count=True``) because the published numbers (Su et al. 2022, Table 1) were
  computed with it; ``simctg_count=False`` counts all L - n + 1 n-grams.
* rep-n is in percent, as SimCTG reports it: ``100·(1 - Σ unique / Σ total)``. Diversity is a fraction in [0, 1],
  ``Π_{n=2..4} (1 - rep-n/100)``; the TMLR tables print it ×100. Unlike SimCTG, rep-n is not rounded to two decimals
  before the product.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _ngram_counts(text: str, n: int, simctg_count: bool) -> tuple[int, int]:
    tokens = text.split()
    count = max(len(tokens) - n + (0 if simctg_count else 1), 0)
    ngrams = [tuple(tokens[i : i + n]) for i in range(count)]
    return len(set(ngrams)), len(ngrams)


def rep_n(texts: Sequence[str], n: int, *, simctg_count: bool = True) -> float:
    """Corpus-level rep-n in percent: ``100·(1 - Σ_texts |unique n-grams| / Σ_texts |n-grams|)`` (Su et al. 2022, §5.1).

    Unique n-grams are counted within each text. ``simctg_count`` keeps SimCTG's L - n n-grams per text (see module
    docstring). Raises ValueError when no text is long enough to hold an n-gram.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    counts = [_ngram_counts(text, n, simctg_count) for text in texts]
    total = sum(count for _, count in counts)
    if total == 0:
        raise ValueError(f"no text holds a {n}-gram to count")
    return 100.0 * (1.0 - sum(unique for unique, _ in counts) / total)


def diversity(texts: Sequence[str], *, simctg_count: bool = True) -> float:
    """``Π_{n=2,3,4} (1 - rep-n/100)`` in [0, 1]; 1 when no n-gram repeats (Su et al. 2022, §5.1)."""
    result = 1.0
    for n in (2, 3, 4):
        result *= 1.0 - rep_n(texts, n, simctg_count=simctg_count) / 100.0
    return result


def isotropy(hidden_states_list: Sequence[torch.Tensor]) -> float:
    """``1 - Σ_seqs Σ_{i≠j} cos(h_i, h_j) / Σ_seqs n(n-1)`` (Su & Collier 2023, Eq. 1 averaged over sequences), in [0, 2].

    Args:
        hidden_states_list: one ``(n_i, E)`` tensor per sequence: the model's last-layer hidden states
            (``output_hidden_states[-1]``) of its tokens, padding removed. Pairs are taken within a sequence only,
            and the mean is pooled over all pairs, so a sequence weighs n(n-1); one with n = 1 adds no pair.
    """
    cosine_sum, pairs = 0.0, 0
    for hidden in hidden_states_list:
        if hidden.dim() != 2:
            raise ValueError(f"each sequence's hidden states must be (n, E), got shape {tuple(hidden.shape)}")
        unit = torch.nn.functional.normalize(hidden.detach().double(), dim=-1)
        n = unit.shape[0]
        # Σ_{i≠j} cos = |Σ_i u_i|² - Σ_i |u_i|², without the n×n matrix.
        cosine_sum += (unit.sum(dim=0).square().sum() - unit.square().sum()).item()
        pairs += n * (n - 1)
    if pairs == 0:
        raise ValueError("isotropy needs at least one sequence of two or more tokens")
    return 1.0 - cosine_sum / pairs
