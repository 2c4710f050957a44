"""Score-based SDEs (Song et al. 2021) on the core: the VE, VP (and sub-VP: not yet) processes
(`config.process.schedule` ve | vp), a noise-predicting network (score = -eps / sigma), denoising
score matching with lambda(t) = sigma_t^2 (the eps loss), and the predictor-corrector sampler
(reverse diffusion + Langevin, `sample.solver='pc'`) or the probability-flow ODE (any ODE solver)."""
from jaxdiff.methods.gaussian import (NEEDS_PRIOR_IMAGES, check, likelihood_model, loss, model_factory,  # noqa: F401
                                     out_channels, sampling)
