"""Gaussian data with independent coefficients in a process's basis, and its ideal network in every
parameterisation, for closed-form tests of jaxdiff.parameterize and jaxdiff.samplers.

Data: u_x = V^T x with u_x[k] ~ N(m[k], v[k]) independent. On a process u = alpha x + sigma eps per
coefficient, so the ideal (posterior-mean) estimates are, per coefficient,

    x0 = m + v alpha (u - alpha m) / (alpha^2 v + sigma^2),   eps = (u - alpha x0) / sigma,

and the probability-flow ODE in scaled coordinates x~ = u / alpha, sigma~ = sigma / alpha is solved
exactly by x~(sigma~) = m + (x~_1 - m) sqrt((v + sigma~^2) / (v + sigma~_1^2)).
"""
import jax.numpy as jnp
import numpy as np

from jaxdiff import parameterize, precond, processes


def moments(shape=(4, 4, 1), seed=0):
    """(m, v) of the data in the basis, float64 [H, W, C]."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=shape) * 0.5, rng.uniform(0.05, 1.0, size=shape)


def ideal_x0_eps_basis(u, alpha, sigma, m, v):
    x0 = m + v * alpha * (u - alpha * m) / (alpha ** 2 * v + sigma ** 2)
    return x0, (u - alpha * x0) / sigma


def time_from_label(process, c_noise):
    """Invert `processes.noise_label` (DDPM step index or 1000 t)."""
    if isinstance(process.schedule, processes.Discrete):
        return (c_noise + 1) / process.schedule.T
    return c_noise / 1000


def ideal_net(process, output, m, v, sigma_data=0.5):
    """`net(params, x, c_noise, labels, augment_labels) -> F` whose `output` parameterisation is ideal."""
    m, v = jnp.asarray(m), jnp.asarray(v)

    def net(params, x, c_noise, labels=None, augment_labels=None):
        if output == 'edm':  # x = c_in x~, c_noise = ln(sigma~) / 4 (EDMPrecond)
            level = jnp.exp(4 * c_noise).reshape(-1, 1, 1, 1)
            x_tilde = x * jnp.sqrt(level ** 2 + sigma_data ** 2)
            x0, _ = ideal_x0_eps_basis(x_tilde, 1.0, level, m, v)
            c_skip, c_out, _, _ = precond.EDMPrecond(sigma_data).scalings(level)
            return (x0 - c_skip * x_tilde) / c_out
        t = time_from_label(process, c_noise)
        alpha, sigma = process.scale_sigma(t, x.shape, x.dtype)
        x0, eps = ideal_x0_eps_basis(process.to_basis(x), alpha, sigma, m, v)
        out = {'eps': eps, 'x0': x0, 'v': alpha * eps - sigma * x0}[output]
        return process.from_basis(out)
    return net


def ideal_model(process, output, m, v):
    return parameterize.model_from_fn(ideal_net(process, output, m, v), process, output)


def exact_flow(x1, sigma1, sigma, m, v):
    """x~ at noise level sigma from x~_1 at sigma1 along the exact PF-ODE (per coefficient)."""
    return m + (x1 - m) * np.sqrt((v + sigma ** 2) / (v + sigma1 ** 2))


PROCESSES = {
    'cosine': processes.GaussianProcess(processes.Cosine()),
    'vp': processes.GaussianProcess(processes.VP()),
    'subvp': processes.GaussianProcess(processes.SubVP()),
    've': processes.GaussianProcess(processes.VE()),
    'edm': processes.GaussianProcess(processes.EDM()),
    'ddpm': processes.GaussianProcess(processes.Discrete('linear', 1000)),
    'blurring': processes.BlurringProcess(sigma_blur_max=3.0),
}
