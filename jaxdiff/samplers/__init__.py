"""Every sampler on every process and every parameterisation: `Sampler` (the configuration, every
solver named in `sampler.py`), host float64 time grids (`grids.py`), step tables and step
functions (`steps.py`) and one jit-compiled `lax.scan` driver (`driver.py`).

    x = samplers.sample(samplers.Sampler(solver='dpmpp_2m', num_steps=10, discretization='logsnr'),
                        model, latents)
"""
from jaxdiff.samplers.driver import bind, keys_from_seeds, latents_from_keys, sample, step_noise_from_keys
from jaxdiff.samplers.sampler import DISCRETIZATIONS, SOLVERS, SPACINGS, VARIANCES, Sampler, edm_sampler

__all__ = ['DISCRETIZATIONS', 'SOLVERS', 'SPACINGS', 'VARIANCES', 'Sampler', 'bind', 'edm_sampler',
           'keys_from_seeds', 'latents_from_keys', 'sample', 'step_noise_from_keys']
