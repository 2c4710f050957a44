"""DDPM (Ho et al. 2020) and improved DDPM (Nichol & Dhariwal 2021) on the core: a Discrete beta
schedule (`config.process`: schedule 'discrete', betas linear | cosine | sigmoid, T), an eps (or
x0, v) network, the L_simple loss, and DDPM's ancestral sampler; DDIM, DPM-Solver++ and every
other solver sample the same checkpoint (`--config.sample.solver=...`)."""
from jaxdiff.methods.gaussian import (NEEDS_PRIOR_IMAGES, check, likelihood_model, loss, model_factory,  # noqa: F401
                                     out_channels, sampling)
