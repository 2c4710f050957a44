"""Time grids of the samplers, on the host in float64 (the grid is an argument, as in k-diffusion).

A grid is N process times t_0 > t_1 > ... > t_{N-1} with their (DC) noise levels sigma~_i = sigma_t / alpha_t;
every sampler then takes a final step to the data (sigma~ = 0). EDM's discretisations are defined
on noise levels and mapped to times with the process's inverse schedule; the others on times.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from jaxdiff import processes, schedules


class Grid(NamedTuple):
    t: np.ndarray      # [N] process times, noisiest first
    sigma: np.ndarray  # [N] scalar (DC) noise levels sigma_t / alpha_t at those times


def dc_noise_level(process, t) -> np.ndarray:
    """sigma_t / alpha_t of the schedule (the DC frequency's, which blurring never damps), float64."""
    alpha, sigma = process.schedule.alpha_sigma(np.asarray(t, np.float64))
    return np.asarray(sigma / alpha, np.float64)


def process_noise_range(process) -> tuple[float, float]:
    """(sigma~(t_min), sigma~(t_max)): the noise levels the process spans."""
    lo, hi = dc_noise_level(process, np.array([process.t_min, process.t_max]))
    return float(lo), float(hi)


def default_sigma_range(sampler) -> tuple[float, float]:
    """EDM's generate.py defaults of the noise-level discretisations, or the sampler's own."""
    vp = schedules.vp_sigma(np.array([sampler.epsilon_s, 1.0]))
    lo = {'vp': vp[0], 've': 0.02, 'iddpm': 0.002, 'edm': 0.002}[sampler.discretization]
    hi = {'vp': vp[1], 've': 100.0, 'iddpm': 81.0, 'edm': 80.0}[sampler.discretization]
    return (float(lo) if sampler.sigma_min is None else sampler.sigma_min,
            float(hi) if sampler.sigma_max is None else sampler.sigma_max)


def sigma_range(sampler, process, net_sigma_min: float = 0.0, net_sigma_max: float = float('inf')):
    """The discretisation's [sigma_min, sigma_max] clamped to what the model and the process support."""
    lo, hi = schedules.clamp_sigma_range(*default_sigma_range(sampler), net_sigma_min, net_sigma_max)
    lo, hi = schedules.clamp_sigma_range(lo, hi, *process_noise_range(process))
    if not lo < hi:
        raise ValueError(f'Empty noise range: sigma_min={lo} >= sigma_max={hi} (after clamping to the range '
                         'the model and the process support)')
    return lo, hi


def time_range(sampler, process) -> tuple[float, float]:
    """[t_min, t_max] of the time grids: the process's, narrowed to sampler.sigma_min/sigma_max when
    given; an unbounded process (EDM's of a plain denoiser, sigma in [0, inf)) gets EDM's 0.002..80."""
    lo, hi = process_noise_range(process)
    want_lo = sampler.sigma_min if sampler.sigma_min is not None else (0.002 if not lo > 0 else None)
    want_hi = sampler.sigma_max if sampler.sigma_max is not None else (80.0 if not np.isfinite(hi) else None)
    t_min = process.t_min if want_lo is None else float(process.t_from_noise_level(max(want_lo, lo)))
    t_max = process.t_max if want_hi is None else float(process.t_from_noise_level(min(want_hi, hi)))
    if not t_min < t_max:
        raise ValueError(f'Empty time range [{t_min}, {t_max}] (sigma_min={sampler.sigma_min}, '
                         f'sigma_max={sampler.sigma_max} on a process spanning noise levels {lo}..{hi})')
    return t_min, t_max


def edm_noise_levels(sampler, sigma_min: float, sigma_max: float) -> np.ndarray:
    """The N noise levels of EDM's discretisation `sampler.discretization`, largest first."""
    n = sampler.num_steps
    if sampler.discretization == 'vp':
        return schedules.vp_sigma_steps(n, sigma_min, sigma_max, sampler.epsilon_s)
    if sampler.discretization == 've':
        return schedules.ve_sigma_steps(n, sigma_min, sigma_max)
    if sampler.discretization == 'iddpm':
        return schedules.iddpm_sigma_steps(n, sigma_min, sigma_max, schedules.iddpm_u(sampler.M, sampler.C_1, sampler.C_2))
    return schedules.edm_sigma_steps(n, sigma_min, sigma_max, sampler.rho)


def time_grid(sampler, process, net_sigma_min: float = 0.0, net_sigma_max: float = float('inf'),
              round_sigma=lambda sigma: sigma) -> Grid:
    """The sampler's N grid points on `process` (see the module docstring)."""
    n, kind = sampler.num_steps, sampler.discretization
    if kind in ('edm', 'vp', 've', 'iddpm'):
        sigma = np.asarray(round_sigma(edm_noise_levels(sampler, *sigma_range(sampler, process, net_sigma_min,
                                                                                   net_sigma_max))), np.float64)
        return Grid(np.asarray(process.t_from_noise_level(sigma), np.float64), sigma)
    if kind == 'ddpm':
        if not isinstance(process.schedule, processes.Discrete):
            raise ValueError(f"sample.discretization='ddpm' respaces a Discrete (DDPM) schedule, got "
                             f'{type(process.schedule).__name__}')
        steps = schedules.ddpm_timesteps(process.schedule.T, n, sampler.spacing, sampler.steps_offset)
        t = (np.asarray(steps, np.float64) + 1) / process.schedule.T
    else:
        t_min, t_max = time_range(sampler, process)
        if kind == 'uniform':
            t = np.linspace(t_max, t_min, n, dtype=np.float64)
        else:  # 'logsnr'
            lo, hi = process.schedule.logsnr(np.array([t_max, t_min], np.float64))
            t = np.asarray(process.schedule.t_from_logsnr(np.linspace(lo, hi, n)), np.float64)
            t[0], t[-1] = t_max, t_min  # exact ends, not inverse round trips
    if not np.all(np.isfinite(t)):
        raise ValueError(f'sample.discretization={kind!r} needs a process with a finite time range, '
                         f'got [{process.t_min}, {process.t_max}]')
    return Grid(t, dc_noise_level(process, t))
