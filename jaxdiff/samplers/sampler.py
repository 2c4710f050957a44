"""`Sampler`: the configuration of every sampler, with every solver named in one place.

Solvers (each works on every process and every parameterisation; `steps.py` has the formulas):

  'euler', 'heun'  EDM's generalised sampler (Karras et al. 2022, Algorithms 1-2, App. D): Euler or
                   2nd-order Heun steps of the probability-flow ODE in EDM's time variable
                   (`schedule`, `scaling`, Heun's point t + heun_point h), optional churn (S_*)
  'ddim'           DDIM (Song et al. 2021, eq. 12) with `eta` (0: deterministic, = 'euler' in sigma~)
  'ancestral'      DDPM's ancestral step (Ho et al. 2020) with `variance` 'fixed_small' (the
                   posterior's), 'fixed_large' (the forward step's, beta_t) or 'learned_range' (iDDPM)
  'exp_heun'       a 2nd-order exponential integrator in log sigma~ (stable where sigma~ drops by
                   orders of magnitude in one step: blurring's high frequencies)
  'dpmpp_2m'       DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2)
  'pc'             score-SDE predictor-corrector (Song et al. 2021, Algorithm 2): `corrector_steps`
                   Langevin steps with signal-to-noise ratio `snr`, then a reverse-diffusion step

Time grids (`grids.py`; `discretization`), largest noise first, followed by a final step to the
data (noise level 0):

  'edm', 'vp', 've', 'iddpm'  EDM's noise-level discretisations (rho; sigma_min/sigma_max default to
                              each one's own, then clamped to what the model and process support)
  'uniform'                   N times uniform in the process's t, from t_max to t_min
  'logsnr'                    N times uniform in logSNR (DPM-Solver's grid)
  'ddpm'                      DDPM respacing of a Discrete schedule: `spacing` leading | trailing |
                              linspace | quad, `steps_offset`
"""
from __future__ import annotations

import dataclasses

SOLVERS = ('euler', 'heun', 'ddim', 'ancestral', 'exp_heun', 'dpmpp_2m', 'pc')
DISCRETIZATIONS = ('edm', 'vp', 've', 'iddpm', 'uniform', 'logsnr', 'ddpm')
EDM_SCHEDULES = ('vp', 've', 'linear')
EDM_SCALINGS = ('vp', 'none')
VARIANCES = ('fixed_small', 'fixed_large', 'learned_range')
SPACINGS = ('leading', 'trailing', 'linspace', 'quad')


@dataclasses.dataclass(frozen=True)
class Sampler:
    """Configuration of a sampler; the defaults are EDM's Algorithm 2 (deterministic, 18 steps).

    num_steps: N grid points (model evaluations: `num_evals`).
    schedule, scaling, heun_point: EDM's time variable for 'euler'/'heun': sigma(t) 'linear' (t),
      'vp', 've' (sqrt t); s(t) 'none' (1) or 'vp'; Heun's second point t + heun_point h (EDM's
      alpha; 1 = trapezoid).
    S_churn, S_min, S_max, S_noise: EDM's churn ('euler'/'heun'); S_churn = 0 is deterministic.
    """
    num_steps: int = 18
    solver: str = 'heun'
    discretization: str = 'edm'
    sigma_min: float | None = None
    sigma_max: float | None = None
    rho: float = 7.0
    epsilon_s: float = 1e-3
    C_1: float = 0.001
    C_2: float = 0.008
    M: int = 1000
    spacing: str = 'leading'
    steps_offset: int = 0
    schedule: str = 'linear'
    scaling: str = 'none'
    heun_point: float = 1.0
    S_churn: float = 0.0
    S_min: float = 0.0
    S_max: float = float('inf')
    S_noise: float = 1.0
    eta: float = 0.0
    variance: str = 'fixed_small'
    snr: float = 0.16
    corrector_steps: int = 1

    def __post_init__(self):
        for field, allowed in (('solver', SOLVERS), ('discretization', DISCRETIZATIONS),
                               ('schedule', EDM_SCHEDULES), ('scaling', EDM_SCALINGS),
                               ('variance', VARIANCES), ('spacing', SPACINGS)):
            if getattr(self, field) not in allowed:
                raise ValueError(f'Sampler.{field} must be one of {allowed}, got {getattr(self, field)!r}')
        least = 2 if self.discretization in ('edm', 'vp', 've', 'iddpm', 'uniform', 'logsnr') else 1
        if int(self.num_steps) != self.num_steps or self.num_steps < least:
            raise ValueError(f'Sampler.num_steps must be an integer >= {least} for discretization '
                             f'{self.discretization!r}, got {self.num_steps}')
        if not 0 < self.heun_point <= 1:
            raise ValueError(f'Sampler.heun_point must be in (0, 1], got {self.heun_point}')
        if self.S_churn < 0 or self.S_noise < 0:
            raise ValueError('Sampler.S_churn and Sampler.S_noise must be non-negative')
        if not 0 <= self.eta <= 1:
            raise ValueError(f'Sampler.eta must be in [0, 1], got {self.eta}')
        if self.snr <= 0 or int(self.corrector_steps) != self.corrector_steps or self.corrector_steps < 0:
            raise ValueError('Sampler.snr must be > 0 and Sampler.corrector_steps an integer >= 0')
        if self.solver not in ('euler', 'heun') and (self.schedule, self.scaling, self.heun_point) != ('linear', 'none', 1.0):
            raise ValueError(f'Sampler.schedule/scaling/heun_point choose the time variable of euler/heun, '
                             f'not of {self.solver!r}')

    @property
    def stochastic(self) -> bool:
        """Whether the sampler draws noise (then it needs a key)."""
        return ((self.solver in ('euler', 'heun') and self.S_churn > 0 and self.S_noise > 0)
                or (self.solver == 'ddim' and self.eta > 0) or self.solver in ('ancestral', 'pc'))

    @property
    def num_evals(self) -> int:
        """Model evaluations per sample."""
        n = self.num_steps
        if self.solver in ('heun', 'exp_heun'):
            return 2 * n - 1
        if self.solver == 'pc':
            return n * (1 + self.corrector_steps)
        return n


def edm_sampler(num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                S_churn: float = 0.0, S_min: float = 0.0, S_max: float = float('inf'),
                S_noise: float = 1.0) -> Sampler:
    """EDM's Algorithm 2: Heun steps on sigma(t) = t at the rho-spaced noise levels."""
    return Sampler(num_steps=num_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho,
                   S_churn=S_churn, S_min=S_min, S_max=S_max, S_noise=S_noise)
