"""Record iDDPM's hybrid loss (openai/improved-diffusion, `GaussianDiffusion.training_losses` with
learned-range variance and LossType.RESCALED_MSE, i.e. L_simple + T/1000 L_t in bits) on fixed
inputs, for tests/test_losses_vlb.py. The project's tests never import torch.

improved-diffusion is not on PyPI: point IDDPM at a checkout of github.com/openai/improved-diffusion
(the package directory `improved_diffusion` must be importable from it). Nothing of it is copied
here; this script imports it and calls it. Run with the torch of tests/data/make_gaussian_refs.py:

    IDDPM=/path/to/improved-diffusion /work/refvenv/bin/python tests/data/make_iddpm_refs.py

Everything runs in float64. improved-diffusion keeps its tables in float64 numpy but casts each
gathered coefficient to float32 (`_extract_into_tensor` ends in `.float()`); this script replaces
that helper by one that keeps float64 (the same gather without the cast). Two recordings:
'approx_cdf' is improved-diffusion as it is; 'exact_cdf' replaces its tanh approximation of the
normal CDF (`losses.approx_standard_normal_cdf`) by the exact one (torch.special.ndtr), which is
what jaxdiff uses, so the decoder term can be compared to rounding.

Arrays (NHWC where image-shaped, [N=6, 4, 4, 3]): inputs/x_start (8-bit levels in [-1, 1], with
-1 and 1 present), inputs/noise, inputs/model_output (6 channels: eps, then the variance values),
inputs/t_index (improved-diffusion's 0-based t; jaxdiff's t = (index + 1) / T), and per schedule
{cosine_T100, linear_T1000}/{approx_cdf, exact_cdf}/{loss, mse, vb}: per-image values.
"""
import json
import os
import pathlib
import sys

import numpy as np
import torch

sys.path.insert(0, os.environ['IDDPM'])
from improved_diffusion import gaussian_diffusion as gd, losses  # noqa: E402

OUT = pathlib.Path(__file__).parent / 'gaussian' / 'iddpm_hybrid.npz'


def _extract_float64(arr, timesteps, broadcast_shape):
    """improved-diffusion's `_extract_into_tensor` without its cast to float32."""
    res = torch.from_numpy(arr)[timesteps]
    while len(res.shape) < len(broadcast_shape):
        res = res[..., None]
    return res.expand(broadcast_shape)


def main():
    gd._extract_into_tensor = _extract_float64
    rng = np.random.default_rng(0)
    n = 6
    levels = rng.integers(0, 256, (n, 4, 4, 3))
    levels[:, 0, 0, 0], levels[:, 0, 1, 0] = 0, 255
    x_start = levels / 127.5 - 1
    noise = rng.standard_normal((n, 4, 4, 3))
    model_output = np.concatenate([rng.standard_normal((n, 4, 4, 3)), 0.7 * rng.standard_normal((n, 4, 4, 3))], -1)
    out = {'inputs/x_start': x_start, 'inputs/noise': noise, 'inputs/model_output': model_output}
    nchw = lambda a: torch.from_numpy(np.ascontiguousarray(np.transpose(a, (0, 3, 1, 2))))
    approx = losses.approx_standard_normal_cdf
    for name, schedule, T, t_index in (('cosine_T100', 'cosine', 100, [0, 0, 1, 2, 50, 99]),
                                       ('linear_T1000', 'linear', 1000, [0, 1, 9, 300, 700, 999])):
        out[f'{name}/t_index'] = np.array(t_index, np.int64)
        diffusion = gd.GaussianDiffusion(betas=gd.get_named_beta_schedule(schedule, T),
                                         model_mean_type=gd.ModelMeanType.EPSILON,
                                         model_var_type=gd.ModelVarType.LEARNED_RANGE,
                                         loss_type=gd.LossType.RESCALED_MSE)
        for cdf, fn in (('approx_cdf', approx), ('exact_cdf', torch.special.ndtr)):
            losses.approx_standard_normal_cdf = fn
            output = nchw(model_output)
            terms = diffusion.training_losses(lambda x, t: output, nchw(x_start), torch.tensor(t_index),
                                              noise=nchw(noise))
            for key in ('loss', 'mse', 'vb'):
                out[f'{name}/{cdf}/{key}'] = terms[key].numpy().astype(np.float64)
        losses.approx_standard_normal_cdf = approx
    meta = dict(torch=torch.__version__, improved_diffusion='github.com/openai/improved-diffusion HEAD '
                + os.environ.get('IDDPM_COMMIT', '(commit not given)'))
    out['meta/json'] = np.array(json.dumps(meta))
    np.savez(OUT, **out)
    print('wrote', OUT, sorted(out))


if __name__ == '__main__':
    main()
