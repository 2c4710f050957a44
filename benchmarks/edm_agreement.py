"""Measured agreement of jaxdiff with NVlabs/edm on every recorded reference (tests/data/edm).

    python benchmarks/edm_agreement.py [--f64] > agreement.md

For each reference network: max |ours - EDM| / max |EDM| of the raw network output F and the
denoiser D for every recorded preconditioning call, of every loss, and of every sampler run
(our step table + step function with EDM's latents and per-step noise). float32 by default;
--f64 runs everything in float64 against EDM's float64 runs. Uses the tests' helpers.
"""
import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / 'tests'), str(ROOT)]

import test_losses  # noqa: E402
import test_precond  # noqa: E402
import test_samplers_edm  # noqa: E402
from conftest import EDM_NETS, EDMRef  # noqa: E402

from jaxdiff import precond as pc  # noqa: E402
from jaxdiff.nets import convert  # noqa: E402


def network_errors(ref, precision):
    """Raw network output F of every recorded call, through the converter."""
    dtype = np.float32 if precision == 'f32' else np.float64
    kwargs = dict(ref.meta['model_kwargs'])
    model_type = kwargs.pop('model_type')
    out = {}
    for name, aug, run in test_precond.recorded_calls(ref):
        ptype = test_samplers_edm.PRECOND_CLASSES[name]
        module, params, _ = convert.from_edm_state_dict(
            ref.state_dict, model_type, img_resolution=ref.meta['img_resolution'],
            img_channels=ref.meta['img_channels'], label_dim=ref.meta['label_dim'], precond_type=ptype, **kwargs)
        params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
        labels = jnp.asarray(ref['inputs/class_labels'], dtype) if ref.meta['label_dim'] else None
        augment = jnp.asarray(ref['inputs/augment_labels'], dtype) if aug else None
        F = jax.jit(module.apply)({'params': params}, jnp.asarray(ref.nhwc(f'{precision}/den/{run}/c_in_x'), dtype),
                                  jnp.asarray(ref[f'{precision}/den/{run}/c_noise'], dtype), labels, augment)
        out[run] = test_precond.relative_error(F, ref.nhwc(f'{precision}/den/{run}/F'))
    return out


def denoiser_errors(ref, precision):
    """The whole denoiser D = c_skip x + c_out F(c_in x, c_noise) with the converted network."""
    dtype = np.float32 if precision == 'f32' else np.float64
    out = {}
    for name, aug, run in test_precond.recorded_calls(ref):
        denoise = test_samplers_edm.denoiser_for(ref, name, dtype)
        labels = jnp.asarray(ref['inputs/class_labels'], dtype) if ref.meta['label_dim'] else None
        augment = jnp.asarray(ref['inputs/augment_labels'], dtype) if aug else None
        D = denoise(jnp.asarray(ref.nhwc('inputs/x'), dtype), jnp.asarray(ref['inputs/sigma'], dtype), labels, augment)
        out[run] = test_precond.relative_error(D, ref.nhwc(f'{precision}/den/{run}/D'))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--f64', action='store_true')
    args = parser.parse_args()
    precision = 'f64' if args.f64 else 'f32'
    print(f'| reference | quantity | call / run | max rel. error ({precision}) |')
    print('|---|---|---|---|')
    with jax.enable_x64(args.f64):
        for net in EDM_NETS:
            ref = EDMRef(net)
            rows = [('network F', k, v) for k, v in network_errors(ref, precision).items()]
            rows += [('denoiser D', k, v) for k, v in denoiser_errors(ref, precision).items()]
            for name in test_losses.recorded_losses(ref):
                errors = test_losses.check_loss(ref, precision, name)
                rows.append(('loss', name, max(errors['loss'], errors['loss_sum'])))
            for name, run in test_samplers_edm.runs(ref).items():
                rows.append(('sampler', name, test_samplers_edm.check_run(ref, run, precision)))
            for quantity, what, error in rows:
                print(f'| {net} | {quantity} | {what} | {error:.2e} |', flush=True)


if __name__ == '__main__':
    main()
