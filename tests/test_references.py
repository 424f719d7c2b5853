"""The two exact reference models of an image dataset: their parameters against numpy, and the
online estimator on them held against their forward Monte Carlo curves."""

import jax
import numpy as np
import pytest

import jaxdiff_info as jdi
from jaxdiff_info import references as R
from jaxdiff_info.analysis import analyze_model

RNG = np.random.default_rng(0)


def digits():
    """The 1,797 handwritten digits of scikit-learn, 8 x 8 x 1 in [-1, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0 * 2.0 - 1.0)[..., None], d.target


def test_gaussian_reference_is_the_class_mean_and_covariance():
    x, y = RNG.normal(size=(300, 2, 3, 1)), RNG.integers(0, 3, 300)
    mix = R.gaussian_reference(x, y, 3)
    flat = x.reshape(300, -1)
    for c in range(3):
        np.testing.assert_allclose(mix.means[c], flat[y == c].mean(0), atol=1e-6)
        u, l = np.asarray(mix.basis[c], np.float64), np.asarray(mix.spectrum[c], np.float64)
        np.testing.assert_allclose(u @ np.diag(l) @ u.T, np.cov(flat[y == c].T, bias=True), atol=1e-5)
    np.testing.assert_allclose(mix.class_weights, np.bincount(y) / 300, rtol=1e-6)


def test_low_rank_gaussian_reference_keeps_the_top_directions_and_the_total_variance():
    x = RNG.normal(size=(200, 50)) * np.linspace(3, 0.1, 50)
    y = np.repeat([0, 1], 100)
    mix = R.gaussian_reference(x, y, 2, rank=5)
    assert mix.rank == 5 and not mix.complete
    for c in range(2):
        cov = np.cov(x[y == c].T, bias=True)
        top = np.linalg.eigvalsh(cov)[::-1][:5]
        s2 = float(mix.stds[c]) ** 2
        np.testing.assert_allclose(np.asarray(mix.spectrum[c]) + s2, top, rtol=1e-4)
        assert 5 * s2 + float(np.sum(mix.spectrum[c])) + 45 * s2 == pytest.approx(np.trace(cov), rel=1e-4)


def test_empirical_reference_is_every_image_a_point_of_its_class():
    x, y = RNG.normal(size=(30, 4)), RNG.integers(0, 3, 30)
    mix = R.empirical_reference(x, y, 3)
    assert mix.num_components == 30 and mix.num_classes == 3 and mix.points
    np.testing.assert_array_equal(np.bincount(mix.component_class), np.bincount(y))
    for c in range(3):  # grouped by class, in the images' order within it
        np.testing.assert_allclose(mix.means[mix.component_class == c], x[y == c], atol=1e-6)


@pytest.mark.parametrize("args, match", [
    ((np.zeros((4, 2)), np.array([0, 0, 1, 1]), 3), "class 2 has no images"),
    ((np.zeros((4, 2)), np.array([0, 0, 1]), 2), "one label per image"),
    ((np.full((2, 2), np.nan), np.array([0, 1]), 2), "finite"),
])
def test_bad_reference_input(args, match):
    with pytest.raises(ValueError, match=match):
        R.gaussian_reference(*args)
    with pytest.raises(ValueError, match="unknown reference 'linear'"):
        R.make_reference("linear", *args)


def test_gaussian_reference_of_digits_online_agrees_with_forward_mc():
    """The online class-label curve of the digits' Gaussian reference (DDPM, beta~_t) within
    Monte Carlo error of its forward Monte Carlo curve with the exact posterior."""
    x, y = digits()
    mix = R.gaussian_reference(x, y, 10)
    schedule = jdi.linear_schedule(1000)
    online = jdi.online_curves(mix, None, schedule, samples_per_class=64, key=jax.random.key(0), num_resamples=50)
    fmc = jdi.forward_mc_curves(mix, None, schedule, samples_per_class=64, key=jax.random.key(1), num_resamples=50)
    h_on, h_fmc = online.entropy_bits[0], fmc.entropy_bits[0]
    band = (online.entropy_bits_ci95[0, :, 1] - online.entropy_bits_ci95[0, :, 0]
            + fmc.entropy_bits_ci95[0, :, 1] - fmc.entropy_bits_ci95[0, :, 0]) / 2
    inside = np.abs(h_on - h_fmc) <= band + 0.01
    assert inside.mean() > 0.9, np.abs(h_on - h_fmc).max()
    assert np.abs(h_on - h_fmc).max() < 0.15
    assert online.exact_state is not None  # the exact state posterior along the same trajectories
    assert np.abs(online.exact_state.entropy_bits[0] - h_on).max() < 0.1


def test_analyze_model_takes_a_reference():
    x, y = digits()
    keep = np.concatenate([np.flatnonzero(y == c)[:20] for c in range(3)])
    mix = R.empirical_reference(x[keep], y[keep], 3)
    result = analyze_model(mix, jdi.linear_schedule(50), samples_per_class=4, key=jax.random.key(0),
                           shape=(8, 8, 1), num_resamples=10, num_snapshots=3)
    assert result.x_0.shape == (12, 8, 8, 1)
    assert result.forward_mc is not None and result.forward_mc.posterior == "state (exact posterior)"
    assert result.curves.exact_state is not None
    for t, xt, x0 in result.snapshots:
        assert xt.shape[1:] == (8, 8, 1) and x0.shape[1:] == (8, 8, 1)
    # the memorising reference generates its training images (up to the last steps' noise)
    train = x[keep].reshape(60, -1)
    gaps = np.min(np.linalg.norm(result.x_0.reshape(12, 1, -1) - train[None], axis=-1), axis=1)
    pair = np.linalg.norm(train[:, None] - train[None], axis=-1) + np.diag(np.full(60, np.inf))
    assert np.all(gaps < 0.5 * np.median(pair.min(1))), (gaps, np.median(pair.min(1)))
    with pytest.raises(ValueError, match="shape"):
        analyze_model(mix, jdi.linear_schedule(50), samples_per_class=4, key=jax.random.key(0), shape=(8, 8, 3))


def test_overlay_figure_names_every_model_and_marks_peaks():
    from jaxdiff_info import plots
    from jaxdiff_info.curves import class_curves

    mix = jdi.make_mixture([-1.0, 0.0, 1.0], [0.3, 0.3, 0.3])
    schedule = jdi.linear_schedule(50)
    models = {name: jdi.online_curves(mix, None, schedule, samples_per_class=8, key=jax.random.key(i), num_resamples=5)
              for i, name in enumerate(["network", "gaussian", "empirical"])}
    per_class = {n: class_curves(c, c.names[0], ["a", "b", "c"], jax.random.key(9)) for n, c in models.items()}
    fig = plots.reference_overlay_figure(models, per_class, 0, {"network": "net", "gaussian": "linear",
                                                                 "empirical": "memorising"}, "title")
    texts = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    assert texts == ["net", "linear", "memorising"]
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["class label, all trajectories"] + [
        f"trajectories of class {n}" for n in "abc"]
    peaks = [line.get_xdata()[0] for line in panels[1].lines if line.get_linestyle() == ":"]
    np.testing.assert_allclose(peaks, [per_class[n].peak_time[0] for n in models])
    title = fig.get_suptitle().replace("\n", " ")
    assert f"posterior: network, gaussian, empirical: {models['network'].posterior}" in " ".join(title.split()), title
    plots.plt.close(fig)


def test_randomised_top_directions_match_the_exact_ones(monkeypatch):
    """Above EXACT_SVD_WORK the principal directions come from a randomised SVD: on a decaying
    spectrum its top variances and subspace match the exact SVD's."""
    monkeypatch.setattr(R, "EXACT_SVD_WORK", 1e6)  # the randomised path at a size the exact SVD checks quickly
    rng = np.random.default_rng(1)
    a = rng.normal(size=(500, 400)) * (0.9 ** np.arange(400))
    a -= a.mean(0)
    sing, vt = R._top_singular(a, 20, seed=0)
    _, exact, exact_vt = np.linalg.svd(a, full_matrices=False)
    np.testing.assert_allclose(sing, exact[:20], rtol=2e-3)
    overlap = np.linalg.svd(vt[:10] @ exact_vt[:10].T, compute_uv=False)  # cosines of principal angles
    assert overlap.min() > 0.99
