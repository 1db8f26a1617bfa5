"""Baselines: streaming PCA equals a full eigendecomposition, torch FastICA recovers sources and
agrees with scikit-learn, and every baseline exports as a top-k dictionary that loads and
reconstructs as the baseline does."""

import pytest
import sae_lens
import torch
from sklearn.decomposition import FastICA as SklearnFastICA

from dictsweep import load_dictionary
from dictsweep.sae.baselines import (
    StreamingPCA,
    baseline_dictionary,
    fast_ica,
    fit_pca,
    ica_basis,
    identity_basis,
    matched_k,
    pca_basis,
    random_basis,
)
from dictsweep.sae.export import Dictionary, dictionary_files
from dictsweep.sae.metrics import FiringTracker, fvu
from dictsweep.train.bench_baselines import ica_mixture, source_recovery

D_MODEL = 6


def correlated(rows, seed=0):
    """Rows with a non-zero mean and distinct variances along skewed axes, `[rows, D_MODEL]`."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(D_MODEL, D_MODEL, generator=generator) * torch.linspace(0.2, 3.0, D_MODEL)
    return torch.randn(rows, D_MODEL, generator=generator) @ mixing.t() + 5.0


def uneven_batches(x, sizes=(7, 300, 1)):
    """Splits of x into varying batch sizes (the stream's batch size must not matter)."""
    batches, start, index = [], 0, 0
    while start < len(x):
        size = sizes[index % len(sizes)]
        batches.append(x[start : start + size])
        start, index = start + size, index + 1
    return batches


def test_streaming_pca_equals_full_eigendecomposition():
    x = correlated(3000)
    streaming = StreamingPCA(D_MODEL)
    for batch in uneven_batches(x):
        streaming.update(batch)
    pca = streaming.finish()
    full = x.double()
    covariance = torch.cov(full.t(), correction=0)
    variance, axes = torch.linalg.eigh(covariance)
    torch.testing.assert_close(pca.mean, full.mean(0))
    torch.testing.assert_close(pca.variance, variance.flip(0))
    # the same axes up to sign, the first coordinate made non-negative, sorted by variance
    cosines = (pca.components * axes.flip(1).t()).sum(-1)
    torch.testing.assert_close(cosines.abs(), torch.ones(D_MODEL, dtype=torch.float64))
    assert bool((pca.components[:, 0] >= 0).all())
    torch.testing.assert_close(pca.components @ covariance @ pca.components.t(), torch.diag(pca.variance))
    assert bool((pca.variance[:-1] > pca.variance[1:]).all())


def test_streaming_pca_needs_rows():
    with pytest.raises(ValueError, match="no rows"):
        StreamingPCA(D_MODEL).finish()


def test_fast_ica_recovers_sources():
    x, sources, _ = ica_mixture(20_000, 8, seed=1)
    ica = fast_ica(lambda: uneven_batches(x, (3000, 1234)), seed=2)
    assert ica.converged and ica.n_iter < 50
    recovered = source_recovery((x - ica.mean.float()) @ ica.components.float().t(), sources)
    assert float(recovered.min()) >= 0.95
    # the mixing columns are the true ones up to scale, sign and order
    estimated = (x - ica.mean.float()) @ ica.components.float().t()
    torch.testing.assert_close(estimated.std(0, correction=0), torch.ones(8), rtol=1e-3, atol=1e-3)


def test_fast_ica_matches_sklearn_iteration_for_iteration():
    """Same data, whitening convention and initial unmixing: the same iterates, in float64."""
    x, _, _ = ica_mixture(4000, 5, seed=3)
    w_init = torch.randn(5, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ours = fast_ica(lambda: x.double().split(999), w_init=w_init, dtype=torch.float64)
    theirs = SklearnFastICA(n_components=5, w_init=w_init.numpy(), whiten="unit-variance").fit(x.double().numpy())
    assert ours.n_iter == theirs.n_iter_
    torch.testing.assert_close(ours.components, torch.from_numpy(theirs.components_), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(ours.mixing, torch.from_numpy(theirs.mixing_), rtol=1e-8, atol=1e-8)


def test_fast_ica_agrees_with_sklearn_up_to_sign_and_order():
    """Each from its own random start, ours in float32: the same unmixing up to sign and order."""
    x, _, _ = ica_mixture(10_000, 6, seed=5)
    ours = fast_ica(lambda: x.split(2048), n_components=4, seed=6)
    theirs = SklearnFastICA(n_components=4, whiten="unit-variance", random_state=7).fit(x.numpy())
    reference = torch.from_numpy(theirs.components_).double()  # [4, 6]
    normalize = torch.nn.functional.normalize
    cosine = normalize(ours.components, dim=1) @ normalize(reference, dim=1).t()  # [4, 4]
    order = cosine.abs().argmax(1)
    assert sorted(order.tolist()) == [0, 1, 2, 3]
    signs = cosine[torch.arange(4), order].sign().unsqueeze(1)
    torch.testing.assert_close(
        ours.components * signs, reference[order], rtol=0, atol=1e-3 * float(reference.abs().max())
    )


def test_fast_ica_rejects_too_many_components_and_one_shot_streams():
    x, _, _ = ica_mixture(100, 3)
    with pytest.raises(ValueError, match="n_components=4"):
        fast_ica(lambda: [x], n_components=4)
    one_shot = iter(x.split(10))
    with pytest.raises(ValueError, match="fresh iterable"):
        fast_ica(lambda: one_shot)


def fitted_basis(kind, x):
    """One baseline fitted on a stream of `x [rows, D_MODEL]`."""
    pca = fit_pca(uneven_batches(x, (500, 123)))
    if kind == "ica":
        return ica_basis(fast_ica(lambda: uneven_batches(x, (500, 123)), pca=pca, seed=0))
    if kind == "random":
        return random_basis(pca, seed=3)
    return {"pca": pca_basis, "identity": identity_basis}[kind](pca)


def top_k_reconstruction(basis, x, k):
    """mean + the k largest-|coefficient| atoms, straight from the basis (the reference)."""
    coefficients = (x.double() - basis.mean) @ basis.encoder  # [B, n_atoms]
    keep = coefficients.abs().topk(k, dim=-1).indices
    kept = torch.zeros_like(coefficients).scatter(-1, keep, coefficients.gather(-1, keep))
    return (basis.mean + kept @ basis.atoms).float()


@pytest.mark.parametrize("kind", ["pca", "ica", "random", "identity"])
def test_baseline_exports_load_and_reconstruct_as_the_baseline(tmp_path, kind):
    x, _, _ = ica_mixture(3000, D_MODEL, seed=8)
    basis = fitted_basis(kind, x)
    k = 2
    config, weights = baseline_dictionary(basis, k, {"model_name": "toy", "hook_name": "h"})
    module = Dictionary(config, weights)
    firing = FiringTracker(1, 2 * D_MODEL, window_tokens=len(x))
    firing.update((module.encode(x) > 0).sum(0, keepdim=True).float(), len(x))
    folder = tmp_path / kind
    folder.mkdir()
    for name, data in dictionary_files(config, weights, firing.log10_frequency()[0]).items():
        (folder / name).write_bytes(data)

    expected = top_k_reconstruction(basis, x, k)
    ours = load_dictionary(str(folder))
    torch.testing.assert_close(ours(x), expected, rtol=1e-4, atol=1e-4)
    assert float((ours.encode(x) > 0).sum(-1).float().mean()) == k
    assert ours.metadata["dictsweep"]["baseline"] == kind and ours.cfg["d_sae"] == 2 * D_MODEL
    sae = sae_lens.SAE.load_from_disk(str(folder))
    with torch.no_grad():
        torch.testing.assert_close(sae(x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("kind", "k"),
    [("identity", D_MODEL), ("pca", 2 * D_MODEL), ("pca", D_MODEL), ("ica", D_MODEL), ("random", D_MODEL)],
)
def test_complete_bases_reconstruct_exactly(kind, k):
    x, _, _ = ica_mixture(2000, D_MODEL, seed=9)
    module = Dictionary(*baseline_dictionary(fitted_basis(kind, x), k))
    assert float(fvu(x, module(x))) < 1e-6


def test_fvu_falls_with_k_and_pca_beats_random():
    x = correlated(2000, seed=10)
    bases = {kind: fitted_basis(kind, x) for kind in ("pca", "random")}
    curves = {
        kind: [float(fvu(x, Dictionary(*baseline_dictionary(bases[kind], k))(x))) for k in (1, 2, 3)]
        for kind in ("pca", "random")
    }
    for curve in curves.values():
        assert curve[0] > curve[1] > curve[2]
    assert all(pca < random for pca, random in zip(curves["pca"], curves["random"]))


def test_matched_k_and_bad_k():
    basis = identity_basis(fit_pca([correlated(50)]))
    assert matched_k(2.4, basis) == 2 and matched_k(0.2, basis) == 1 and matched_k(40.0, basis) == D_MODEL
    with pytest.raises(ValueError, match="k=13"):
        baseline_dictionary(basis, 2 * D_MODEL + 1)
