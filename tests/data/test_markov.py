import math

import numpy as np

from trainer.data import markov


def test_entropy_rate_matches_the_mean_surprisal_of_a_long_sample():
    src = markov.build_source(num_words=40, successors=5, mean_doc_words=30, seed=3)
    p = markov.transition_matrix(src)
    # Walk the chain and average -log P(next | current) with the true probabilities: converges to the rate.
    rng = np.random.default_rng(0)
    state, total, n = len(src.words), 0.0, 200_000
    cum = np.cumsum(p, axis=1)
    for u in rng.random(n):
        nxt = min(int(np.searchsorted(cum[state], u, side="right")), p.shape[0] - 1)
        total -= math.log(p[state, nxt])
        state = nxt
    assert abs(total / n - markov.entropy_rate(src)) < 0.02


def test_transition_rows_are_distributions():
    p = markov.transition_matrix(markov.build_source(num_words=30, successors=4, seed=1))
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-12)


def test_uniform_successors_give_log_k_entropy_between_boundaries():
    # zipf=0 makes k equiprobable successors; with a rare end of document the rate is close to log k.
    src = markov.build_source(num_words=50, successors=8, zipf=0.0, mean_doc_words=1e6, seed=0)
    assert abs(markov.entropy_rate(src) - math.log(8)) < 1e-3


def test_corpus_is_a_pure_function_of_the_seed():
    src = markov.build_source(num_words=30, successors=4, seed=1)
    a = markov.sample_documents(src, 3000, seed=7)
    b = markov.sample_documents(src, 3000, seed=7)
    c = markov.sample_documents(src, 3000, seed=8)
    assert a == b and a != c
    words = set(src.words)
    assert all(w in words for doc in a for w in doc.split())


def test_sampled_transitions_follow_the_source():
    src = markov.build_source(num_words=20, successors=3, seed=2)
    index = {w: i for i, w in enumerate(src.words)}
    allowed = {i: set(src.successors[i].tolist()) for i in range(20)}
    for doc in markov.sample_documents(src, 5000, seed=0):
        ids = [index[w] for w in doc.split()]
        assert all(b in allowed[a] for a, b in zip(ids, ids[1:], strict=False))
