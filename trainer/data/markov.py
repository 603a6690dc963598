"""The embedded corpus: a word-level Markov chain whose entropy rate is computable.

Each word has a few successors with Zipf-skewed probabilities, and ends the document with probability
1/mean_doc_words. After the end of a document the next one starts from a fixed start distribution. With
one token per word and an EOS token between documents, the packed token stream is itself a first-order
Markov chain over words + EOS, so its entropy rate (nats per token) is the lowest mean cross-entropy any
model can reach on it: the floor reported beside the eval loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


@dataclass(frozen=True)
class MarkovSource:
    words: list[str]
    successors: np.ndarray  # [num_words, k] next-word ids
    probs: np.ndarray  # [num_words, k] probabilities over successors, summing to 1 - p_end
    p_end: float  # probability that a document ends after any word
    start: np.ndarray  # [num_words] distribution of a document's first word


def make_words(num_words: int, rng: np.random.Generator) -> list[str]:
    """Distinct pronounceable pseudo-words, so the text looks like text and tokenizes one word per token."""
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < num_words:
        n = int(rng.integers(1, 4))
        word = "".join(_SYLLABLES[i] for i in rng.integers(0, len(_SYLLABLES), size=n))
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def build_source(
    *,
    num_words: int = 512,
    successors: int = 12,
    zipf: float = 1.1,
    mean_doc_words: float = 200.0,
    seed: int = 0,
) -> MarkovSource:
    if not 1 <= successors <= num_words:
        raise ValueError(f"data.markov.successors={successors}: must be between 1 and num_words={num_words}")
    if mean_doc_words <= 1:
        raise ValueError(f"data.markov.mean_doc_words={mean_doc_words}: must be > 1")
    rng = np.random.default_rng(seed)
    words = make_words(num_words, rng)
    succ = np.stack([rng.choice(num_words, size=successors, replace=False) for _ in range(num_words)])
    ranks = np.arange(1, successors + 1, dtype=np.float64)
    weights = ranks**-zipf
    p_end = 1.0 / mean_doc_words
    probs = np.stack([rng.permutation(weights) for _ in range(num_words)])
    probs = probs / probs.sum(axis=1, keepdims=True) * (1.0 - p_end)
    start = rng.dirichlet(np.ones(num_words))
    return MarkovSource(words=words, successors=succ, probs=probs, p_end=p_end, start=start)


def transition_matrix(src: MarkovSource) -> np.ndarray:
    """Dense [V+1, V+1] transition matrix over words + EOS (EOS is the last state)."""
    v = len(src.words)
    p = np.zeros((v + 1, v + 1))
    rows = np.repeat(np.arange(v), src.successors.shape[1])
    np.add.at(p, (rows, src.successors.ravel()), src.probs.ravel())
    p[:v, v] = src.p_end
    p[v, :v] = src.start
    return p


def entropy_rate(src: MarkovSource) -> float:
    """Entropy rate of the token stream in nats per token: sum_i pi_i H(P_i) with pi stationary."""
    p = transition_matrix(src)
    evals, evecs = np.linalg.eig(p.T)
    pi = np.real(evecs[:, np.argmin(np.abs(evals - 1.0))])
    pi = pi / pi.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        row_h = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    return float(pi @ row_h)


def sample_documents(src: MarkovSource, num_tokens: int, *, seed: int, num_chains: int = 256) -> list[str]:
    """Documents totalling about `num_tokens` words (+EOS), from parallel chains; a pure function of the seed."""
    rng = np.random.default_rng(seed)
    v, k = src.successors.shape
    steps = max(1, -(-num_tokens // num_chains))
    cum = np.cumsum(src.probs, axis=1)
    start_cum = np.cumsum(src.start)
    state = np.minimum(np.searchsorted(start_cum, rng.random(num_chains)), v - 1)
    out = np.empty((num_chains, steps), dtype=np.int64)
    for t in range(steps):
        out[:, t] = state
        u = rng.random(num_chains)
        ended = state == v
        live = np.where(ended, 0, state)
        pick = (cum[live] < u[:, None]).sum(axis=1)
        nxt = np.where(pick < k, src.successors[live, np.minimum(pick, k - 1)], v)
        restart = np.minimum(np.searchsorted(start_cum, rng.random(num_chains)), v - 1)
        state = np.where(ended, restart, nxt)
    docs: list[str] = []
    for chain in out:
        # A chain's tail after its last EOS is an unfinished document: dropped so every document really ended.
        ends = np.flatnonzero(chain == v)
        prev = 0
        for e in ends:
            if e > prev:
                docs.append(" ".join(src.words[i] for i in chain[prev:e]))
            prev = e + 1
    return docs
