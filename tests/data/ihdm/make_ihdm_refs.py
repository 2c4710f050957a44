"""Record reference arrays for tests/test_ihdm.py with the AaltoML IHDM code (PyTorch, CPU).

Reference code: github.com/AaltoML/generative-inverse-heat-dissipation at commit
3f735cadf61609c30094e3aee5a37d82a301aecb (2023-03-03), the code of Rissanen, Heinonen & Solin,
"Generative Modelling With Inverse Heat Dissipation" (ICLR 2023).

Made with (torch 2.13.0 CPU, numpy, scikit-learn and ml_collections in the environment):

    git -C <mirror of the repository> archive 3f735cad | tar -x -C /tmp/ihdm
    /tmp/torchenv/bin/python tests/data/ihdm/make_ihdm_refs.py --repo /tmp/ihdm \
        --out tests/data/ihdm/ihdm_refs.npz

What is recorded (arrays NCHW as the reference code holds them; pixels in [0, 1] as there):

  {cifar,mnist}_sigmas     config.model.blur_schedule of configs/{cifar10,mnist}/default_*_configs.py
                           (K+1 entries, sigma_0 = 0), float64
  {cifar,mnist}_x          a few real-photo patches (sklearn's sample images), float32
  {cifar,mnist}_k          one blur level per image
  {cifar,mnist}_blur_f32   DCTBlur(x, k) with float32 input, cast to float32 (as the loss does)
  {cifar,mnist}_blur_f64   DCTBlur(x.double(), k), float64
  cifar_sweep_k / cifar_sweep_blur   image 0 at several levels, float32
  loss_*                   scripts/losses.get_inverse_heat_loss_fn with the CIFAR-10 config and a
                           small deterministic stand-in network (`stand_in_residual`), with its
                           draws (levels, unit noise) and the per-image and mean losses
  sampler_*                scripts/sampling.get_sampling_fn_inverse_heat on 8x8 images (K=12)
                           with the stand-in network: initial state, per-step unit noise, final
                           output and the saved trajectory

The unit-normal draws are recorded by wrapping torch.randn_like while the reference functions
run; the script checks that replaying them reproduces the reference outputs exactly.
"""
import argparse
import contextlib
import json
import subprocess
import sys
import types

import numpy as np
import torch

COMMIT = '3f735cadf61609c30094e3aee5a37d82a301aecb'


def stand_in_residual(x, k, K):
    """The stand-in network of the loss and sampler references: a fixed nonlinear function of
    (u, k); tests/test_ihdm.py has the same function in JAX."""
    scale = (k.to(x.dtype) / K)[:, None, None, None]
    return -0.3 * x + 0.05 * torch.tanh(4 * x) * scale + 0.01 * x.mean(dim=(1, 2, 3), keepdim=True)


class StandInNet(torch.nn.Module):
    def __init__(self, K):
        super().__init__()
        self.K = K

    def forward(self, x, fwd_steps):
        return stand_in_residual(x, fwd_steps, self.K)


@contextlib.contextmanager
def recording_randn_like():
    """Record every torch.randn_like draw (the unit noise of the reference loss and sampler)."""
    draws, original = [], torch.randn_like

    def recorder(*args, **kwargs):
        draws.append(original(*args, **kwargs).clone())
        return draws[-1].clone()

    torch.randn_like = recorder
    try:
        yield draws
    finally:
        torch.randn_like = original


def photo_patches(n, size, channels, seed):
    from sklearn.datasets import load_sample_images
    images = [im.astype(np.float32) / 255 for im in load_sample_images().images]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        im = images[i % len(images)]
        y, x = rng.integers(0, im.shape[0] - size), rng.integers(0, im.shape[1] - size)
        patch = im[y:y + size, x:x + size]
        patch = patch.mean(-1, keepdims=True) if channels == 1 else patch
        out.append(np.transpose(patch, (2, 0, 1)))
    return np.stack(out).astype(np.float32)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--repo', required=True, help='extracted AaltoML repository')
    parser.add_argument('--out', required=True)
    args = parser.parse_args()
    sys.path.insert(0, args.repo)
    # scripts/sampling.py imports scripts/datasets.py (torchvision, mpi4py, blobfile) only for
    # get_initial_sample, which is not used here: a stub module stands in for it.
    sys.modules['scripts.datasets'] = types.ModuleType('scripts.datasets')
    from configs.cifar10 import default_cifar10_configs
    from configs.mnist import default_mnist_configs
    from model_code import utils as mutils
    from scripts import losses, sampling

    torch.set_num_threads(1)
    out = {}
    configs = {'cifar': default_cifar10_configs.get_config(), 'mnist': default_mnist_configs.get_config()}
    for name, config in configs.items():
        config.device = torch.device('cpu')
        size, channels, K = config.data.image_size, config.data.num_channels, config.model.K
        sigmas = np.asarray(config.model.blur_schedule, np.float64)
        blur = mutils.create_forward_process_from_sigmas(config, sigmas, 'cpu')
        x = photo_patches(4 if name == 'cifar' else 3, size, channels, seed=len(name))
        k = np.array([1, 2, K // 2 + 17, K][:len(x)] if name == 'cifar' else [1, K - 1, K])
        with torch.no_grad():
            out[f'{name}_sigmas'] = sigmas
            out[f'{name}_x'] = x
            out[f'{name}_k'] = k
            out[f'{name}_blur_f32'] = blur(torch.from_numpy(x), torch.from_numpy(k)).float().numpy()
            out[f'{name}_blur_f64'] = blur(torch.from_numpy(x).double(), torch.from_numpy(k)).numpy()
            if name == 'cifar':
                sweep = np.array([0, 1, 2, 3, 50, 100, 199, 200])
                x0 = torch.from_numpy(np.repeat(x[:1], len(sweep), 0))
                out['cifar_sweep_k'] = sweep
                out['cifar_sweep_blur'] = blur(x0, torch.from_numpy(sweep)).float().numpy()

    # The loss, with the CIFAR-10 setting.
    config = configs['cifar']
    K, sigma = config.model.K, config.model.sigma
    blur = mutils.create_forward_process_from_sigmas(config, np.asarray(config.model.blur_schedule), 'cpu')
    batch = torch.from_numpy(out['cifar_x'])
    net = StandInNet(K)
    loss_fn = losses.get_inverse_heat_loss_fn(config, train=False, scales=None, device='cpu',
                                              heat_forward_module=blur)
    torch.manual_seed(1234)
    with torch.no_grad(), recording_randn_like() as draws:
        loss, losses_batch, fwd_steps = loss_fn(net, batch)
        assert len(draws) == 1
        unit_noise = draws[0]
        perturbed = blur(batch, fwd_steps).float() + unit_noise * sigma
        replay = ((blur(batch, fwd_steps - 1).float() - (perturbed + net(perturbed, fwd_steps))) ** 2).sum((1, 2, 3))
        assert torch.equal(replay, losses_batch), (replay, losses_batch)
    out['loss_k'] = fwd_steps.numpy()
    out['loss_unit_noise'] = unit_noise.numpy()
    out['loss_per_image'] = losses_batch.numpy()
    out['loss_mean'] = np.asarray(loss.item())
    out['loss_sigma'] = np.asarray(sigma)

    # The sampler, on a small problem (it only needs config.model.K and the device).
    sconfig = default_mnist_configs.get_config()
    sconfig.device = torch.device('cpu')
    sconfig.data.image_size = 8
    sconfig.model.K = K_s = 12
    s_sigmas = np.array([0] + list(np.exp(np.linspace(np.log(0.5), np.log(4.0), K_s))))
    sblur = mutils.create_forward_process_from_sigmas(sconfig, s_sigmas, 'cpu')
    x8 = photo_patches(2, 8, 1, seed=8)
    delta = 0.0125
    torch.manual_seed(99)
    with torch.no_grad():
        init = sblur(torch.from_numpy(x8), torch.full((2,), K_s)).float()
        init = init + torch.randn_like(init) * delta  # as evaluate.py's FID sampling
    sampler = sampling.get_sampling_fn_inverse_heat(sconfig, init, list(range(K_s + 1)), delta, 'cpu')
    snet = StandInNet(K_s)
    torch.manual_seed(5)
    with recording_randn_like() as draws:
        final, _, trajectory = sampler(snet)
    step_noise = torch.stack(draws)
    assert step_noise.shape[0] == K_s
    with torch.no_grad():  # replay
        u = init
        for i, k in enumerate(range(K_s, 0, -1)):
            mean = u + snet(u, torch.full((2,), k))
            u = mean + step_noise[i] * delta
        assert torch.equal(mean, final)
    out['sampler_sigmas'] = s_sigmas
    out['sampler_delta'] = np.asarray(delta)
    out['sampler_init'] = init.numpy()
    out['sampler_step_noise'] = step_noise.numpy()
    out['sampler_final'] = final.numpy()
    out['sampler_trajectory'] = torch.stack(trajectory).numpy()

    meta = {'repository': 'github.com/AaltoML/generative-inverse-heat-dissipation', 'commit': COMMIT,
            'torch': torch.__version__, 'numpy': np.__version__,
            'command': 'python tests/data/ihdm/make_ihdm_refs.py --repo <extracted repo> --out <npz>'}
    try:
        meta['repo_head'] = subprocess.run(['git', '-C', args.repo, 'rev-parse', 'HEAD'], capture_output=True,
                                           text=True).stdout.strip() or None
    except OSError:
        meta['repo_head'] = None
    out['meta/json'] = np.asarray(json.dumps(meta))
    np.savez_compressed(args.out, **out)
    for key, value in out.items():
        print(key, value.shape, value.dtype)


if __name__ == '__main__':
    main()
