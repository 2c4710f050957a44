"""From a raw network's output to the data and noise estimates (x0_hat, eps_hat) on a process.

A process gives z_t = V (alpha_t V^T x) + sigma_t eps (`jaxdiff.processes`); per basis coefficient
u = V^T z = alpha x + sigma eps. A model is a network F plus an output type:

  'eps'   F(z; c) = eps_hat                        x0_hat = (u - sigma eps_hat) / alpha
  'x0'    F(z; c) = x0_hat                         eps_hat = (u - alpha x0_hat) / sigma
  'v'     F(z; c) = v_hat, v = alpha eps - sigma x  x0_hat = (alpha u - sigma v_hat) / (alpha^2 + sigma^2)
                                                   eps_hat = (sigma u + alpha v_hat) / (alpha^2 + sigma^2)
          (Salimans & Ho 2022; alpha^2 + sigma^2 = 1 on a variance-preserving process)
  'edm'   EDM's preconditioning (Karras et al. 2022, Table 1) of `precond`: with x~ = z / alpha and
          sigma~ = sigma / alpha, x0_hat = D(x~; sigma~) = c_skip x~ + c_out F(c_in x~; c_noise),
          eps_hat = (x~ - x0_hat) / sigma~. Needs one scale per image (not blurring).

The noise label c of 'eps'/'x0'/'v' is `noise_labels`: 'schedule' (DDPM's step index for a
discrete schedule, else 1000 t: `processes.noise_label`) or 'logsnr' (lambda_t, simple diffusion).
`learned_variance`: the network has 2C outputs and the last C are iDDPM's variance interpolation
v in [-1, 1] (Nichol & Dhariwal 2021, eq. 15), returned as `Prediction.variance_fraction` (v + 1) / 2.

A conditional network (label_dim > 0) called without labels gets zeros (EDM's convention for
"no label"; also the null label of classifier-free guidance). Label dropout and dropout keys are
the network's, through `precond.FlaxNet(train=True, dropout_key=...)`.

`Guided(model, scale)` is classifier-free guidance (Ho & Salimans 2022) on any model:
eps~ = eps_u + s (eps_c - eps_u), with eps_u the prediction with the null (zero) label. s = 1 is the
conditional model, s = 0 the unconditional one; Ho & Salimans' w is s - 1 (their
eps~ = (1 + w) eps_c - w eps_u), and EDM2's guidance D = lerp(D_u, D_c, s) is the same s (x0_hat
is affine in eps_hat at fixed z, so guiding one guides the other identically).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp

from jaxdiff import precond as pc
from jaxdiff import processes

OUTPUTS = ('eps', 'x0', 'v', 'edm')
NOISE_LABELS = ('schedule', 'logsnr')


class Prediction(NamedTuple):
    """x0_hat and eps_hat in pixel space (z's shape and dtype); variance_fraction only with
    learned variance."""
    x0: jax.Array
    eps: jax.Array
    variance_fraction: jax.Array | None = None


class _OnProcess:
    """`model(z, t, labels)`: `predict` with (alpha_t, sigma_t) of the model's process at t."""

    def __call__(self, z, t, labels=None, augment_labels=None) -> Prediction:
        alpha, sigma = self.process.scale_sigma(t, z.shape, z.dtype)
        return self.predict(z, t, alpha, sigma, labels, augment_labels)


class _Wrapper(_OnProcess):
    """A model around `self.model`: its process, noise range and learned variance are the inner model's."""

    @property
    def process(self):
        return self.model.process

    @property
    def sigma_min(self) -> float:
        return self.model.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.model.sigma_max

    def round_sigma(self, sigma):
        return self.model.round_sigma(sigma)

    @property
    def learned_variance(self) -> bool:
        return getattr(self.model, 'learned_variance', False)


class Model(_OnProcess, flax.struct.PyTreeNode):
    """`model(z, t, labels=None) -> Prediction` for one network and its parameters on `process`.

    `predict(z, t, alpha, sigma, labels)` is the same with (alpha_t, sigma_t) given (the samplers
    pass their float64 step tables'). A pytree: its leaves are the parameters, so a sampler or
    loss compiles once and takes new parameters.
    """
    params: Any
    net: Callable  # net(params, x, noise_labels, class_labels, augment_labels)
    process: Any = flax.struct.field(pytree_node=False)
    output: str = flax.struct.field(pytree_node=False, default='eps')
    precond: Any = flax.struct.field(pytree_node=False, default=None)  # output 'edm': a precond.Precond
    noise_labels: str = flax.struct.field(pytree_node=False, default='schedule')
    learned_variance: bool = flax.struct.field(pytree_node=False, default=False)
    label_dim: int = flax.struct.field(pytree_node=False, default=0)

    @property
    def sigma_min(self) -> float:
        """The noise levels the model supports (EDM preconditionings; else all), which samplers respect."""
        return self.precond.sigma_min if self.output == 'edm' else 0.0

    @property
    def sigma_max(self) -> float:
        return self.precond.sigma_max if self.output == 'edm' else float('inf')

    def round_sigma(self, sigma):
        return self.precond.round_sigma(sigma) if self.output == 'edm' else sigma

    def predict(self, z, t, alpha, sigma, labels=None, augment_labels=None) -> Prediction:
        n, channels = z.shape[0], z.shape[-1]
        if self.label_dim and labels is None:
            labels = jnp.zeros((n, self.label_dim), z.dtype)
        t = jnp.broadcast_to(jnp.asarray(t, z.dtype).reshape(-1), (n,))
        if self.output == 'edm':
            x, noise_level = z / alpha, (sigma / alpha).reshape(-1)
            c_skip, c_out, c_in, c_noise = self.precond.scalings(pc._batch_sigma(noise_level, z))
            F = self.net(self.params, c_in * x, c_noise.reshape(-1), labels, augment_labels)
            x0 = c_skip * x + c_out * F[..., :channels].astype(z.dtype)
            return Prediction(x0, (x - x0) / (sigma / alpha), _fraction(F, channels, self.learned_variance, z.dtype))
        if self.noise_labels == 'logsnr':
            c_noise = self.process.schedule.logsnr(t)
        else:
            c_noise = processes.noise_label(self.process.schedule, t)
        F = self.net(self.params, z, c_noise, labels, augment_labels)
        out = F[..., :channels].astype(z.dtype)
        p = self.process
        if self.output == 'eps':
            x0 = p.from_basis((p.to_basis(z) - sigma * p.to_basis(out)) / alpha)
            eps = out
        elif self.output == 'x0':
            x0 = out
            eps = (z - p.from_basis(alpha * p.to_basis(out))) / sigma
        else:  # 'v'
            u, v = p.to_basis(z), p.to_basis(out)
            norm = alpha ** 2 + sigma ** 2
            x0, eps = p.from_basis((alpha * u - sigma * v) / norm), p.from_basis((sigma * u + alpha * v) / norm)
        return Prediction(x0, eps, _fraction(F, channels, self.learned_variance, z.dtype))


def _fraction(F, channels, learned_variance, dtype):
    """iDDPM's variance interpolation (v + 1) / 2 from the network's last C channels."""
    return (F[..., channels:2 * channels].astype(dtype) + 1) / 2 if learned_variance else None


def check(process, output: str, noise_labels: str = 'schedule', learned_variance: bool = False) -> None:
    """A one-line ValueError for a combination that makes no sense."""
    if output not in OUTPUTS:
        raise ValueError(f'model.output must be one of {OUTPUTS}, got {output!r}')
    if noise_labels not in NOISE_LABELS:
        raise ValueError(f'model.noise_labels must be one of {NOISE_LABELS}, got {noise_labels!r}')
    if output == 'edm' and not process.scalar_scale:
        raise ValueError("model.output='edm' (EDM preconditioning) needs a process with one scale per image, "
                         f'not {type(process).__name__}')
    if learned_variance and not process.schedule.variance_preserving:
        raise ValueError('model.learned_variance interpolates variances of a variance-preserving process; '
                         f'{type(process.schedule).__name__} is not one')


def make_model(module, params, process, output: str = 'eps', *, precond=None, noise_labels: str = 'schedule',
               learned_variance: bool = False, train: bool = False, dropout_key=None) -> Model:
    """Model of a jaxdiff Flax network (`module(x, noise_labels, class_labels, augment_labels, train=...)`)."""
    check(process, output, noise_labels, learned_variance)
    if train and dropout_key is None:
        raise ValueError('make_model(train=True) needs a dropout_key')
    return Model(params=params, net=pc.FlaxNet(module, train, dropout_key), process=process, output=output,
                 precond=precond if output != 'edm' or precond is not None else pc.EDMPrecond(),
                 noise_labels=noise_labels, learned_variance=learned_variance,
                 label_dim=getattr(module, 'label_dim', 0))


def model_from_fn(fn: Callable, process, output: str = 'eps', params: Any = None, **kwargs) -> Model:
    """Model of a plain function `fn(params, x, noise_labels, class_labels, augment_labels)`."""
    check(process, output, kwargs.get('noise_labels', 'schedule'), kwargs.get('learned_variance', False))
    if output == 'edm':
        kwargs.setdefault('precond', pc.EDMPrecond())
    return Model(params=params, net=jax.tree_util.Partial(fn), process=process, output=output, **kwargs)


class DenoiserModel(_OnProcess, flax.struct.PyTreeNode):
    """An EDM-style denoiser D(x; sigma) (a `precond.Denoiser`, an analytic one, ...) as a model on a
    process with one scale per image: x~ = z / alpha, sigma~ = sigma / alpha, x0_hat = D(x~; sigma~)."""
    denoise: Callable
    process: Any = flax.struct.field(pytree_node=False)

    @property
    def sigma_min(self) -> float:
        return getattr(self.denoise, 'sigma_min', 0.0)

    @property
    def sigma_max(self) -> float:
        return getattr(self.denoise, 'sigma_max', float('inf'))

    def round_sigma(self, sigma):
        return getattr(self.denoise, 'round_sigma', lambda s: s)(sigma)

    def predict(self, z, t, alpha, sigma, labels=None, augment_labels=None) -> Prediction:
        x, noise_level = z / alpha, sigma / alpha
        x0 = self.denoise(x, noise_level.reshape(-1), labels, augment_labels).astype(z.dtype)
        return Prediction(x0, (x - x0) / noise_level)


def from_denoiser(denoise: Callable, process) -> DenoiserModel:
    """`DenoiserModel` of `denoise(x, sigma, labels=None, augment_labels=None)`."""
    if not process.scalar_scale:
        raise ValueError(f'A denoiser D(x; sigma) needs a process with one scale per image, got {process}')
    leaves = jax.tree_util.tree_leaves(denoise)
    if len(leaves) == 1 and leaves[0] is denoise:  # a plain function: a static pytree
        denoise = jax.tree_util.Partial(denoise)
    return DenoiserModel(denoise=denoise, process=process)


class Guided(_Wrapper, flax.struct.PyTreeNode):
    """Classifier-free guidance: eps~ = eps_u + s (eps_c - eps_u), x0~ likewise (module docstring).

    `interval` (lo, hi): guide only where the noise level sigma_t / alpha_t lies in [lo, hi]
    (Kynkäänniemi et al. 2024), elsewhere the conditional prediction. The conditional and
    unconditional passes run as one batch of 2N.
    """
    model: Any
    scale: float = flax.struct.field(pytree_node=False, default=1.0)
    interval: tuple | None = flax.struct.field(pytree_node=False, default=None)

    def predict(self, z, t, alpha, sigma, labels=None, augment_labels=None) -> Prediction:
        if labels is None:
            raise ValueError('Guided needs labels (the conditional half); the null label is zeros')
        n = z.shape[0]
        twice = lambda a: jnp.concatenate([a, a]) if jnp.ndim(a) and a.shape[0] == n else a
        both = self.model.predict(twice(z), twice(jnp.broadcast_to(jnp.asarray(t, z.dtype).reshape(-1), (n,))),
                                  twice(alpha), twice(sigma), jnp.concatenate([labels, jnp.zeros_like(labels)]),
                                  None if augment_labels is None else twice(augment_labels))
        cond = jax.tree.map(lambda a: a[:n], both)
        uncond = jax.tree.map(lambda a: a[n:], both)
        s = jnp.asarray(self.scale, z.dtype)
        if self.interval is not None:
            level = (sigma / alpha)[:, :1, :1, :1] if jnp.ndim(sigma) else sigma / alpha
            level = jnp.broadcast_to(level, (n, 1, 1, 1))
            s = jnp.where((level >= self.interval[0]) & (level <= self.interval[1]), s, 1)
        guide = lambda c, u: None if c is None else u + s * (c - u)
        return Prediction(guide(cond.x0, uncond.x0), guide(cond.eps, uncond.eps), cond.variance_fraction)


class ClipDenoised(_Wrapper, flax.struct.PyTreeNode):
    """x0_hat clipped to the data range [lo, hi] and eps_hat made consistent with it:
    x0~ = clip(x0_hat, lo, hi), eps~ = V (u - alpha V^T x0~) / sigma (DDPM's and iDDPM's
    `clip_denoised`, Ho et al. 2020 sec. 3.3's data range). Any process, any sampler."""
    model: Any
    lo: float = flax.struct.field(pytree_node=False, default=-1.0)
    hi: float = flax.struct.field(pytree_node=False, default=1.0)

    def predict(self, z, t, alpha, sigma, labels=None, augment_labels=None) -> Prediction:
        p = self.process
        prediction = self.model.predict(z, t, alpha, sigma, labels, augment_labels)
        x0 = jnp.clip(prediction.x0, self.lo, self.hi)
        eps = p.from_basis((p.to_basis(z) - alpha * p.to_basis(x0)) / sigma)
        return Prediction(x0, eps, prediction.variance_fraction)


class LowSNRCutoff(_Wrapper, flax.struct.PyTreeNode):
    """A model whose prediction is the no-signal limit (x0_hat = 0, eps_hat = u / sigma) on every basis
    coefficient whose logSNR lambda = 2 log(alpha / sigma) is below `logsnr_cutoff`.

    Why: on the blurring process the frequencies held at the d_min floor have sigma~ = sigma / alpha
    up to ~1e5, so a trained network's x0_hat = (u - sigma eps_hat) / alpha is its eps error times
    1e5 there. The ancestral sampler's fresh noise forgets it; a deterministic ODE carries it to
    the end (checkerboard samples). Below the cutoff the ideal prediction is the no-signal limit up
    to a relative error of order exp(lambda), so a cutoff well below the data's logSNR costs little
    (measured on the digits: benchmarks/RESULTS.md §4; -8 best).
    """
    model: Any
    logsnr_cutoff: float = flax.struct.field(pytree_node=False, default=-8.0)

    def predict(self, z, t, alpha, sigma, labels=None, augment_labels=None) -> Prediction:
        p = self.process
        prediction = self.model.predict(z, t, alpha, sigma, labels, augment_labels)
        low = 2 * (jnp.log(alpha) - jnp.log(sigma)) < self.logsnr_cutoff
        u = p.to_basis(z)
        x0 = jnp.where(low, 0, p.to_basis(prediction.x0))
        eps = jnp.where(low, u / sigma, p.to_basis(prediction.eps))
        return Prediction(p.from_basis(x0), p.from_basis(eps), prediction.variance_fraction)
