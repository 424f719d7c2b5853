"""A Gaussian mixture diffused by the VP process: every quantity in closed form.

Components k (mean m_k, covariance S_k = U_k diag(l_k) U_k^T + s_k^2 I, weight pi_k) grouped
into classes (`model`); densities, posteriors, scores, eps and denoisers of one point x (d,)
at alpha_bar, `jax.vmap` them over points (`closed_form`); draws (`sampling`); the mixture as
a class-conditional eps-predictor (`network`). Under the forward process

    p(x_t | k) = N(x_t; sqrt(abar) m_k, abar S_k + (1 - abar) I).

Class index C (one past the last class) means "no class": the unconditional mixture, the same
convention as the null class of a classifier-free-guided network.

The formulas: docs/method.md, "Gaussian mixtures in closed form", "Full-covariance components
and classes made of components" and "The mixture as a network".
"""

from jaxdiff_info.mixture.closed_form import (
    DIRECT_MAX_DIM,
    class_denoisers,
    class_eps,
    class_scores,
    component_log_joint,
    component_log_posterior,
    denoiser,
    eps,
    log_joint,
    log_posterior,
    log_prob,
    log_prob_given_class,
    log_prob_given_component,
    score,
    squared_distances,
)
from jaxdiff_info.mixture.model import (GaussianMixture, centred, check_class_weights, class_layout, make_mixture,
                                        permute)
from jaxdiff_info.mixture.network import eps_fn
from jaxdiff_info.mixture.sampling import (
    sample_classes,
    sample_components,
    sample_x0,
    sample_xt,
    sample_xt_given_classes,
    xt_given_component,
)

__all__ = [
    "DIRECT_MAX_DIM", "GaussianMixture", "centred", "class_denoisers", "class_eps", "class_layout", "class_scores",
    "component_log_joint", "component_log_posterior", "denoiser", "eps", "eps_fn", "log_joint", "log_posterior",
    "log_prob", "log_prob_given_class", "log_prob_given_component", "make_mixture", "permute", "sample_classes",
    "sample_components", "sample_x0", "sample_xt", "sample_xt_given_classes", "score", "squared_distances",
    "xt_given_component",
]
