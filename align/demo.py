"""The built-in offline demo task: a synthetic language, a small base policy and a known true reward.

1. A seeded bigram Markov chain over a word vocabulary (``align.rewards.tasks``) is the "language";
   reward words are rarer than penalty words in it, so the base policy is real but suboptimal.
2. A small Llama is trained on text from the chain (the base policy), cached on disk.
3. Preference pairs: two completions sampled from the base policy per prompt, labelled by the
   true reward with Bradley-Terry sampling, P(a ≻ b) = σ(bt_scale · (R(a) − R(b))).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from align.cache import cache_dir
from align.models.tiny import tiny_llama, word_tokenizer
from align.rewards.tasks import BAD_WORDS, GOOD_WORDS, NEUTRAL_WORDS, sentiment_reward
from align.sampling import HFSampler, SamplingParams

logger = logging.getLogger(__name__)

WORDS = GOOD_WORDS + BAD_WORDS + NEUTRAL_WORDS


@dataclass(frozen=True)
class DemoSpec:
    seed: int = 0
    prompt_words: int = 4
    sentence_words: tuple[int, int] = (10, 16)
    good_mass: float = 0.12  # share of next-word probability on reward words
    bad_mass: float = 0.22   # share on penalty words
    pretrain_sentences: int = 4000
    pretrain_steps: int = 600
    hidden_size: int = 64
    layers: int = 2
    heads: int = 2  # head size 32: vLLM's CPU attention needs 32, 64, 80, ...

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


class MarkovLanguage:
    """Bigram chain: each word has a random (Dirichlet-like) distribution over next words with fixed
    total mass on reward and penalty words."""

    def __init__(self, spec: DemoSpec):
        self.spec = spec
        rng = random.Random(spec.seed)
        self.next_probs: dict[str, list[float]] = {}
        for word in ["<s>"] + WORDS:
            weights = [rng.expovariate(1.0) for _ in WORDS]
            groups = [(GOOD_WORDS, spec.good_mass), (BAD_WORDS, spec.bad_mass),
                      (NEUTRAL_WORDS, 1 - spec.good_mass - spec.bad_mass)]
            probs, offset = [], 0
            for group, mass in groups:
                w = weights[offset : offset + len(group)]
                probs += [mass * x / sum(w) for x in w]
                offset += len(group)
            self.next_probs[word] = probs

    def sentence(self, rng: random.Random) -> list[str]:
        lo, hi = self.spec.sentence_words
        words, prev = [], "<s>"
        for _ in range(rng.randint(lo, hi)):
            prev = rng.choices(WORDS, weights=self.next_probs[prev])[0]
            words.append(prev)
        return words

    def prompts(self, n: int, seed: int) -> list[str]:
        rng = random.Random(seed)
        return [" ".join(self.sentence(rng)[: self.spec.prompt_words]) for _ in range(n)]


def _pretrain(model, tokenizer, language: MarkovLanguage, spec: DemoSpec) -> None:
    rng = random.Random(spec.seed + 1)
    texts = [" ".join(language.sentence(rng)) for _ in range(spec.pretrain_sentences)]
    ids = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    torch.manual_seed(spec.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=spec.pretrain_steps)
    model.train()
    for step in range(spec.pretrain_steps):
        batch = [ids[rng.randrange(len(ids))] for _ in range(32)]
        width = max(map(len, batch))
        input_ids = torch.tensor([b + [tokenizer.pad_token_id] * (width - len(b)) for b in batch])
        mask = (torch.arange(width)[None] < torch.tensor([len(b) for b in batch])[:, None]).long()
        labels = input_ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 100 == 0 or step == spec.pretrain_steps - 1:
            logger.info("demo base model: step %d/%d, LM loss %.3f", step + 1, spec.pretrain_steps, loss.item())
    model.eval()


def base_model_path(spec: DemoSpec = DemoSpec()) -> Path:
    """Build (once) and cache the demo's tokenizer and base policy; return the directory."""
    path = cache_dir() / f"demo-base-{spec.key()}"
    if (path / "config.json").exists():
        return path
    logger.info("building the demo base model in %s (once; later runs reuse it)", path)
    tokenizer = word_tokenizer(WORDS)
    model = tiny_llama(len(tokenizer), hidden_size=spec.hidden_size, layers=spec.layers, heads=spec.heads,
                       intermediate_size=2 * spec.hidden_size, seed=spec.seed,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    _pretrain(model, tokenizer, MarkovLanguage(spec), spec)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, path)  # atomic: a crash never leaves a half-written cache
    except OSError:
        if not (path / "config.json").exists():
            raise
        shutil.rmtree(tmp)  # another process built the same model first: keep theirs
    return path


def preference_pairs(model, tokenizer, prompts: list[str], *, seed: int, max_new_tokens: int = 12,
                     bt_scale: float = 20.0) -> list[dict]:
    """Two base-policy samples per prompt, labelled with Bradley-Terry sampling on the true reward.
    Rows also carry the true rewards (``chosen_reward``/``rejected_reward``) for scored trainers."""
    sampler = HFSampler(model, tokenizer)
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    samples = sampler.sample(prompt_ids, SamplingParams(n=2, max_new_tokens=max_new_tokens, seed=seed))
    rng = random.Random(seed)
    rows = []
    for p, (i, j) in zip(prompts, samples.grouped()):
        a, b = samples.texts[i].strip(), samples.texts[j].strip()
        if not a or not b or a == b:
            continue
        ra, rb = sentiment_reward([p, p], [a, b])
        if rng.random() >= 1 / (1 + math.exp(-bt_scale * (ra - rb))):
            (a, ra), (b, rb) = (b, rb), (a, ra)
        rows.append({"prompt": p, "chosen": a, "rejected": b, "chosen_reward": ra, "rejected_reward": rb})
    return rows
