"""Record reference arrays from widely used PyTorch diffusion code for the Gaussian-diffusion tests.

The project's tests never import torch: they load the npz files written here and feed the stored
inputs to the JAX code. This script imports and *calls* the reference packages (nothing of theirs
is copied here); it only builds inputs, injects noise and stores what the references return.

Rerun (CPU only, deterministic: fixed numpy seeds, injected noise, torch.manual_seed(0)):

    python3 -m venv /work/refvenv
    /work/refvenv/bin/pip install torch==2.13.0            # the local CPU wheel
    /work/refvenv/bin/pip install --no-deps diffusers==0.42.1 k-diffusion==0.1.1.post1 \
        denoising-diffusion-pytorch==2.3.4 torchdiffeq==0.2.5
    /work/refvenv/bin/pip install numpy scipy huggingface_hub safetensors regex requests \
        importlib_metadata Pillow einops tqdm torchsde trampoline
    /work/refvenv/bin/python tests/data/make_gaussian_refs.py

Versions used for the stored files (also in every file's `meta/json`): torch 2.13.0+cpu,
diffusers 0.42.1, k-diffusion 0.1.1.post1, denoising-diffusion-pytorch 2.3.4 (torchsde 0.2.6,
torchdiffeq 0.2.5, einops 0.8.2, numpy 2.4.6). The script warns if the installed ones differ.

Conventions
-----------
* Every float array is stored as float64 (values the reference computed in float32 are stored
  exactly, widened to float64). Integer timestep grids are int64.
* Image-shaped arrays are stored NHWC, shape [2, 4, 4, 3] (batch 2, 4x4, 3 channels). diffusers
  is called with the NCHW transpose (np.transpose(a, (0, 3, 1, 2))) and its outputs are transposed
  back. For `learned_range` the DDPM model output has 2C = 6 channels: NHWC channels 0..2 are the
  epsilon/x0/v output and channels 3..5 the predicted variance ("v" in [-1, 1]); in NCHW that is
  diffusers' `torch.split(model_output, C, dim=1)`. k-diffusion and the denoising-diffusion-pytorch
  helpers are layout agnostic and are called on NHWC arrays directly.
* Keys are '/'-separated paths. Inputs live under `inputs/`; `meta/json` is a 0-d unicode array
  holding json.dumps({...}) with the versions, stubs and per-file notes. A leading `f32/` or `f64/`
  says in which precision the *reference* ran (see below). Per-step results are stacked on a
  leading axis over the recorded timesteps / indices, which are stored next to them.

Where the reference forces float32
----------------------------------
* diffusers DDPMScheduler / DDIMScheduler hard-code `dtype=torch.float32` for `betas` (and
  `betas_for_alpha_bar` casts its float64 list to float32); alphas_cumprod is a float32 cumprod and
  the step coefficients (1 - alpha_prod, ** 0.5, ...) are float32 0-d tensors even when
  sample/model_output are float64. `f32/...` keys are diffusers exactly as shipped. `f64/...` keys run
  the same diffusers code with the name `torch` inside scheduling_ddpm / scheduling_ddim replaced,
  during the run, by a proxy whose `float32` attribute is torch.float64 (everything else forwarded),
  and with torch's default dtype float64 (for `torch.tensor(1.0)` and the 'sigmoid' linspace).
* diffusers ScoreSdeVeScheduler and k-diffusion `get_sigmas_karras` build their grids with
  `torch.linspace` in torch's *default* dtype (float32 unless changed): `f32/` keys use the stock
  default, `f64/` keys set torch.set_default_dtype(torch.float64) (a public switch, no patching).
  ScoreSdeVe's step_correct draws its noise with dtype=None, i.e. in the default dtype: in f32 mode
  the injected noise is rounded to float32 before use.
* denoising-diffusion-pytorch `sigmoid_beta_schedule` computes float64, except
  `torch.tensor(start / tau).sigmoid()` / `torch.tensor(end / tau).sigmoid()`, which follow the
  default dtype: `betas` keys are with default float64, `betas_default_f32` with the stock default.
  linear/cosine are explicit float64. simple_diffusion's functions follow their inputs (float64).
  (Its `GaussianDiffusion` in denoising_diffusion_pytorch.py stores buffers as float32; not used.)

Files and keys
--------------
diffusers_ddpm.npz  (diffusers DDPMScheduler / DDIMScheduler, T = num_train_timesteps = 1000)
  {f32,f64}/schedule/{linear,scaled_linear,scaled_linear_sd,squaredcos_cap_v2,sigmoid}/{betas,alphas_cumprod}
      linear/scaled_linear/sigmoid: beta_start 1e-4, beta_end 0.02; scaled_linear_sd: 0.00085..0.012
      (Stable Diffusion); 'sigmoid' is diffusers' GeoDiff curve (DDPMScheduler only).
  timesteps/{ddpm,ddim}/{leading,trailing,linspace}/offset{0,1}/n{7,10,50,1000}   (int64)
  inputs/predicted_variance [2,4,4,3] in [-1,1]; get_variance/n{1000,50}/t_values
  {f32,f64}/get_variance/n{1000,50}/{fixed_small,fixed_small_log,fixed_large,fixed_large_log,
      learned,learned_range}: DDPMScheduler._get_variance(t, predicted_variance) for each t
      ([len(t)] for fixed types, [len(t),2,4,4,3] for learned ones), linear schedule, after
      set_timesteps(n) (leading, offset 0).
  inputs/{sample,model_output,model_output_2c,noise}; step/t_values = [980, 500, 20, 0]
      (entries of the 50-step 'leading' grid 980, 960, ..., 0, also on the 1000-step grid).
  {f64,f32}/ddpm/n{50,1000}/{fixed_small,learned_range}/{epsilon,sample,v_prediction,epsilon_clip}/
      {prev_sample,pred_original_sample}: DDPMScheduler.step, linear schedule, leading, clip_sample
      False (epsilon_clip: clip_sample True, range 1), thresholding False. Its noise comes from the
      module-level `randn_tensor`, patched to return inputs/noise (one call per step, none at t=0).
      f32 has only the fixed_small/learned_range epsilon cases of n50.
  {f64,f32}/ddim/n50/eta{0,1}/alpha_one_{True,False}/{epsilon,sample,v_prediction}/... and
      (eta1/alpha_one_True only) .../epsilon_clip (clip_sample True) and .../epsilon_clip_use_clipped
      (plus use_clipped_model_output=True): DDIMScheduler.step with variance_noise=inputs/noise passed
      explicitly when eta > 0. f32 has only eta1/alpha_one_True/epsilon. pred_original_sample does
      not depend on eta or set_alpha_to_one; it is stored with each case anyway.
ddpm_pytorch_schedules.npz  (denoising-diffusion-pytorch)
  linear/T{1000,500}/betas (linear_beta_schedule scales 1e-4..0.02 by 1000/T), cosine/s0.008/betas,
  sigmoid/start{a}_end{b}_tau{c}/{betas,betas_default_f32} for (-3,3,1), (-3,3,0.5), (0,3,0.7)
  logsnr/t (101 points, 0..1); logsnr/cosine (logsnr_min -15, logsnr_max 15 defaults),
  logsnr/cosine_min-20_max20; logsnr/shifted/image{32,64,128,256,512}_noise{32,64}
  (logsnr_schedule_shifted(logsnr_schedule_cosine, image_d, noise_d));
  logsnr/interpolated/image{...}_low32_high256 (logsnr_schedule_interpolated(logsnr_schedule_cosine,
  image_d, noise_d_low, noise_d_high)).
  simple_diffusion.GaussianDiffusion on a model that returns the fixed inputs/model_pred:
  {cosine,interp128}/q_sample/{x_noised,log_snr} for inputs/{x_start,noise,times};
  {cosine,interp128}/p_losses/{v,eps}/minsnr{5,off}/{target,losses} (loss_reduction='none'; target
  captured from its F.mse_loss call); {cosine,interp128}/p_mean_variance/{v,eps}/{model_mean,
  posterior_variance} for inputs/pmv_times (pairs time, time_next) at x = inputs/x_t.
  'interp128' = image_size 128, noise_d_low 32, noise_d_high 256.
kdiffusion.npz  (k_diffusion.sampling)
  {f32,f64}/karras/n{5,10,20}/sigmas: get_sigmas_karras(n, 0.002, 80, rho=7) (n+1 values, last 0).
  inputs/{mu,s} [4,4,3], inputs/latents [2,4,4,3]; denoiser D(x; sigma) = mu + s^2/(s^2+sigma^2)(x-mu).
  n{n}/x_init = sigmas[0] * latents (f64 sigmas); n{n}/{euler,heun,dpmpp_2m}/{x_final,n_calls} and,
  for n <= 10, .../x_traj [n,2,4,4,3] (x_traj[i] = x passed to the callback at step i, i.e. before
  step i); euler/heun with s_churn 0;
  n{n}/exact_ode_x0: the exact probability-flow-ODE endpoint, computed here in numpy (not a reference).
diffusers_score_sde_ve.npz  (diffusers ScoreSdeVeScheduler, sigma_min 0.01, sigma_max 50,
  num_train_timesteps 1000, snr 0.16, sampling_eps 1e-5)
  {f32,f64}/N{1000,100}/{timesteps,sigmas,discrete_sigmas}: after set_timesteps(N), set_sigmas(N, ...)
  {f32,f64}/N{N}/step_pred_g2 [N]: sigma_i^2 - sigma_{i-1}^2 as step_pred uses it at step i (read off
  prev_sample_mean of step_pred(ones, timesteps[i], zeros) with zero noise);
  {f32,f64}/N{N}/step_pred/{i_values,timestep,prev_sample,prev_sample_mean} at i in 0, 1, N/2, N-1,
  timestep = timesteps[i], model_output inputs/score, sample inputs/sample, noise inputs/noise_pred.
  {f32,f64}/step_correct/prev_sample for inputs/score, inputs/sample, noise inputs/noise_correct.

Stubs (light modules put into sys.modules, for imports of things never called here)
  * torchvision, torchvision.transforms(.functional), torchvision.utils: imported at module level by
    k_diffusion/utils.py and denoising_diffusion_pytorch/denoising_diffusion_pytorch.py for image
    I/O and the Trainer only (the PyPI torchvision does not work beside this torch).
  * ema_pytorch.EMA, accelerate.Accelerator: imported by denoising_diffusion_pytorch.py for Trainer.
  * The packages `k_diffusion` and `denoising_diffusion_pytorch` get an empty package module (with
    the real __path__) so that their __init__, which imports every model/trainer module (skimage,
    clean-fid, wandb, ...), is skipped; the submodules used here are the real files.
  diffusers is imported before the stubs, so it sees torchvision as absent.
"""
import contextlib
import importlib.metadata
import importlib.util
import json
import pathlib
import sys
import types

import numpy as np
import torch

# diffusers first: it probes for torchvision with importlib.util.find_spec, which a stub breaks.
from diffusers.schedulers import scheduling_ddim, scheduling_ddpm, scheduling_sde_ve  # noqa: E402

EXPECTED_VERSIONS = {
    'torch': '2.13.0+cpu',
    'diffusers': '0.42.1',
    'k-diffusion': '0.1.1.post1',
    'denoising-diffusion-pytorch': '2.3.4',
}
VERSION_PACKAGES = ('torch', 'diffusers', 'k-diffusion', 'denoising-diffusion-pytorch', 'torchsde',
                    'torchdiffeq', 'einops', 'numpy')
STUBS = ['torchvision', 'torchvision.transforms', 'torchvision.transforms.functional',
         'torchvision.utils', 'ema_pytorch', 'accelerate',
         'k_diffusion (package __init__ skipped)', 'denoising_diffusion_pytorch (package __init__ skipped)']
OUT = pathlib.Path(__file__).resolve().parent / 'gaussian'
SHAPE = (2, 4, 4, 3)   # NHWC


# ----------------------------------------------------------------------------- import helpers

def _stub(name, **attrs):
    """A placeholder module for an import whose contents are never used by this script."""
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module


def _bare_package(name):
    """Register package `name` without running its __init__ (submodules import from its real path)."""
    spec = importlib.util.find_spec(name)
    module = types.ModuleType(name)
    module.__path__ = list(spec.submodule_search_locations)
    sys.modules[name] = module


def import_stubbed_references():
    # Stubs: torchvision / ema_pytorch / accelerate are only used by image I/O and the Trainer
    # classes, which this script never calls (see the module docstring).
    tv = _stub('torchvision')
    tv.transforms = _stub('torchvision.transforms')
    tv.transforms.functional = _stub('torchvision.transforms.functional')
    tv.utils = _stub('torchvision.utils')
    _stub('ema_pytorch', EMA=object)
    _stub('accelerate', Accelerator=object)
    # Skip the package __init__s, which import every model / training module.
    _bare_package('k_diffusion')
    _bare_package('denoising_diffusion_pytorch')
    import denoising_diffusion_pytorch.denoising_diffusion_pytorch as ddp
    import denoising_diffusion_pytorch.simple_diffusion as simple
    import k_diffusion.sampling as ksampling
    return ddp, simple, ksampling


def versions():
    return {p: importlib.metadata.version(p) for p in VERSION_PACKAGES}


def meta(notes):
    return np.array(json.dumps({'versions': versions(), 'stubs': STUBS, 'layout': 'NHWC',
                                'script': 'tests/data/make_gaussian_refs.py', **notes}, sort_keys=True))


# ----------------------------------------------------------------------------- array helpers

def nchw(a):
    return torch.from_numpy(np.ascontiguousarray(np.transpose(a, (0, 3, 1, 2))))


def nhwc(t):
    return np.ascontiguousarray(np.transpose(t.detach().numpy().astype(np.float64), (0, 2, 3, 1)))


def f64(t):
    return np.asarray(t.detach().numpy() if isinstance(t, torch.Tensor) else t, dtype=np.float64)


@contextlib.contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


class _TorchFloat32IsFloat64:
    """Stands in for the name `torch` inside a diffusers scheduler module: `float32` -> float64."""
    float32 = torch.float64

    def __getattr__(self, name):
        return getattr(torch, name)


@contextlib.contextmanager
def diffusers_precision(mode):
    """'f32': diffusers as shipped. 'f64': its hard-coded float32 schedule dtype made float64."""
    if mode == 'f32':
        with default_dtype(torch.float32):
            yield
        return
    modules = (scheduling_ddpm, scheduling_ddim)
    saved = [m.torch for m in modules]
    try:
        for m in modules:
            m.torch = _TorchFloat32IsFloat64()
        with default_dtype(torch.float64):
            yield
    finally:
        for m, t in zip(modules, saved):
            m.torch = t


class NoiseFeed:
    """Replaces a module's `randn_tensor`: returns the given array (NCHW) in the dtype asked for."""

    def __init__(self, module, array_nchw):
        self.module, self.array, self.calls = module, array_nchw, []

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        assert tuple(shape) == tuple(self.array.shape), (shape, self.array.shape)
        dtype = dtype or torch.get_default_dtype()
        self.calls.append(str(dtype))
        return torch.from_numpy(self.array.copy()).to(dtype)

    def __enter__(self):
        self.saved = self.module.randn_tensor
        self.module.randn_tensor = self
        return self

    def __exit__(self, *exc):
        self.module.randn_tensor = self.saved


# ----------------------------------------------------------------------------- 1. diffusers DDPM / DDIM

def diffusers_ddpm():
    DDPM, DDIM = scheduling_ddpm.DDPMScheduler, scheduling_ddim.DDIMScheduler
    rng = np.random.default_rng(1001)
    out = {}
    T = 1000
    sample = rng.standard_normal(SHAPE)
    model_output = rng.standard_normal(SHAPE)
    predicted_variance = rng.uniform(-1.0, 1.0, SHAPE)
    model_output_2c = np.concatenate([model_output, predicted_variance], axis=-1)
    noise = rng.standard_normal(SHAPE)
    out.update({'inputs/sample': sample, 'inputs/model_output': model_output,
                'inputs/model_output_2c': model_output_2c, 'inputs/noise': noise,
                'inputs/predicted_variance': predicted_variance})
    notes = {'num_train_timesteps': T, 'randn_tensor_calls': {}}

    # Schedules.
    schedules = {
        'linear': dict(beta_schedule='linear', beta_start=1e-4, beta_end=0.02),
        'scaled_linear': dict(beta_schedule='scaled_linear', beta_start=1e-4, beta_end=0.02),
        'scaled_linear_sd': dict(beta_schedule='scaled_linear', beta_start=0.00085, beta_end=0.012),
        'squaredcos_cap_v2': dict(beta_schedule='squaredcos_cap_v2'),
        'sigmoid': dict(beta_schedule='sigmoid', beta_start=1e-4, beta_end=0.02),
    }
    for mode in ('f32', 'f64'):
        with diffusers_precision(mode):
            for name, kw in schedules.items():
                s = DDPM(num_train_timesteps=T, **kw)
                want = torch.float32 if mode == 'f32' else torch.float64
                assert s.betas.dtype == want and s.alphas_cumprod.dtype == want, (name, s.betas.dtype)
                out[f'{mode}/schedule/{name}/betas'] = f64(s.betas)
                out[f'{mode}/schedule/{name}/alphas_cumprod'] = f64(s.alphas_cumprod)
                if name != 'sigmoid':   # DDIMScheduler has no 'sigmoid'; its other schedules agree
                    d = DDIM(num_train_timesteps=T, **kw)
                    assert torch.equal(d.alphas_cumprod, s.alphas_cumprod), name

    # set_timesteps grids.
    for kind, cls in (('ddpm', DDPM), ('ddim', DDIM)):
        for spacing in ('leading', 'trailing', 'linspace'):
            for offset in (0, 1):
                for n in (7, 10, 50, 1000):
                    s = cls(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=offset)
                    s.set_timesteps(n)
                    ts = s.timesteps.numpy()
                    assert ts.dtype == np.int64
                    out[f'timesteps/{kind}/{spacing}/offset{offset}/n{n}'] = ts.copy()

    # DDPMScheduler._get_variance.
    t_values = {1000: [999, 500, 100, 10, 1, 0], 50: [980, 500, 100, 20, 0]}
    pv = nchw(predicted_variance)
    for n, ts in t_values.items():
        out[f'get_variance/n{n}/t_values'] = np.array(ts, dtype=np.int64)
    for mode in ('f32', 'f64'):
        with diffusers_precision(mode):
            for n, ts in t_values.items():
                for vt in ('fixed_small', 'fixed_small_log', 'fixed_large', 'fixed_large_log', 'learned',
                           'learned_range'):
                    s = DDPM(num_train_timesteps=T, beta_schedule='linear', variance_type=vt)
                    s.set_timesteps(n)
                    vals = [s._get_variance(t, predicted_variance=pv, variance_type=vt) for t in ts]
                    if vt.startswith('learned'):
                        arr = np.stack([nhwc(v) for v in vals])
                    else:
                        arr = np.array([float(v) for v in vals])
                    out[f'{mode}/get_variance/n{n}/{vt}'] = arr

    # Steps.
    step_ts = [980, 500, 20, 0]
    out['step/t_values'] = np.array(step_ts, dtype=np.int64)
    x_nchw, eps_nchw, eps2_nchw, noise_nchw = nchw(sample), nchw(model_output), nchw(model_output_2c), nchw(noise)
    pred_cases = {'epsilon': ('epsilon', False, False), 'sample': ('sample', False, False),
                  'v_prediction': ('v_prediction', False, False), 'epsilon_clip': ('epsilon', True, False)}
    for mode in ('f64', 'f32'):
        with diffusers_precision(mode):
            # DDPMScheduler.step
            for n in (50, 1000):
                for vt in ('fixed_small', 'learned_range'):
                    for case, (pred, clip, _) in pred_cases.items():
                        if mode == 'f32' and (n != 50 or case != 'epsilon'):
                            continue
                        s = DDPM(num_train_timesteps=T, beta_schedule='linear', variance_type=vt,
                                 prediction_type=pred, clip_sample=clip, thresholding=False)
                        s.set_timesteps(n)
                        mo = eps2_nchw if vt == 'learned_range' else eps_nchw
                        prevs, x0s = [], []
                        with NoiseFeed(scheduling_ddpm, noise_nchw.numpy()) as feed:
                            for t in step_ts:
                                r = s.step(mo.clone(), t, x_nchw.clone())
                                prevs.append(nhwc(r.prev_sample))
                                x0s.append(nhwc(r.pred_original_sample))
                        key = f'{mode}/ddpm/n{n}/{vt}/{case}'
                        out[key + '/prev_sample'] = np.stack(prevs)
                        out[key + '/pred_original_sample'] = np.stack(x0s)
                        notes['randn_tensor_calls'][key] = feed.calls
            # DDIMScheduler.step
            ddim_cases = dict(pred_cases)
            ddim_cases['epsilon_clip_use_clipped'] = ('epsilon', True, True)
            for eta in (0, 1):
                for alpha_one in (True, False):
                    for case, (pred, clip, use_clipped) in ddim_cases.items():
                        if mode == 'f32' and (eta != 1 or not alpha_one or case != 'epsilon'):
                            continue
                        if case.startswith('epsilon_clip') and (eta != 1 or not alpha_one):
                            continue
                        s = DDIM(num_train_timesteps=T, beta_schedule='linear', prediction_type=pred,
                                 clip_sample=clip, set_alpha_to_one=alpha_one, thresholding=False)
                        s.set_timesteps(50)
                        prevs, x0s = [], []
                        with NoiseFeed(scheduling_ddim, noise_nchw.numpy()) as feed:  # must stay unused
                            for t in step_ts:
                                r = s.step(eps_nchw.clone(), t, x_nchw.clone(), eta=float(eta),
                                           use_clipped_model_output=use_clipped,
                                           variance_noise=noise_nchw.clone() if eta > 0 else None)
                                prevs.append(nhwc(r.prev_sample))
                                x0s.append(nhwc(r.pred_original_sample))
                        assert not feed.calls
                        key = f'{mode}/ddim/n50/eta{eta}/alpha_one_{alpha_one}/{case}'
                        out[key + '/prev_sample'] = np.stack(prevs)
                        out[key + '/pred_original_sample'] = np.stack(x0s)
    notes.update({
        'step_t_values': step_ts,
        'get_variance_t_values': {str(k): v for k, v in t_values.items()},
        'ddpm_step': 'linear 1e-4..0.02, timestep_spacing leading, steps_offset 0, thresholding False; '
                     'epsilon_clip = clip_sample True (clip_sample_range 1). Noise: randn_tensor patched '
                     'in diffusers.schedulers.scheduling_ddpm, returns inputs/noise; 1 call per step with t > 0.',
        'ddim_step': 'linear, leading, steps_offset 0, set_timesteps(50); prev_timestep = t - 1000 // 50; '
                     'variance_noise = inputs/noise passed explicitly when eta > 0.',
        'precision': 'f32 = diffusers as shipped (float32 betas/alphas_cumprod and step coefficients); '
                     'f64 = same code with torch.float32 -> float64 inside scheduling_ddpm/ddim and '
                     'default dtype float64.',
    })
    return out, notes


# ----------------------------------------------------------------------------- 2. denoising-diffusion-pytorch

class FixedOutput(torch.nn.Module):
    """A 'network' that returns a stored array whatever its inputs."""

    def __init__(self, value):
        super().__init__()
        self.register_buffer('value', torch.from_numpy(value))

    def forward(self, x, *args, **kwargs):
        return self.value.clone()


def ddpm_pytorch_schedules(ddp, simple):
    out, notes = {}, {}
    with default_dtype(torch.float64):
        out['linear/T1000/betas'] = f64(ddp.linear_beta_schedule(1000))
        out['linear/T500/betas'] = f64(ddp.linear_beta_schedule(500))
        out['cosine/s0.008/betas'] = f64(ddp.cosine_beta_schedule(1000, s=0.008))
    with default_dtype(torch.float32):
        assert np.array_equal(out['cosine/s0.008/betas'], f64(ddp.cosine_beta_schedule(1000, s=0.008)))
        assert np.array_equal(out['linear/T1000/betas'], f64(ddp.linear_beta_schedule(1000)))
    for start, end, tau in ((-3, 3, 1), (-3, 3, 0.5), (0, 3, 0.7)):
        key = f'sigmoid/start{start}_end{end}_tau{tau}'
        for suffix, dt in (('betas', torch.float64), ('betas_default_f32', torch.float32)):
            with default_dtype(dt):
                b = ddp.sigmoid_beta_schedule(1000, start=start, end=end, tau=tau)
            assert b.dtype == torch.float64
            out[f'{key}/{suffix}'] = f64(b)

    # simple_diffusion logSNR schedules.
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    out['logsnr/t'] = f64(t)
    out['logsnr/cosine'] = f64(simple.logsnr_schedule_cosine(t))
    out['logsnr/cosine_min-20_max20'] = f64(simple.logsnr_schedule_cosine(t, logsnr_min=-20, logsnr_max=20))
    for image_d in (32, 64, 128, 256, 512):
        for noise_d in (32, 64):
            fn = simple.logsnr_schedule_shifted(simple.logsnr_schedule_cosine, image_d=image_d, noise_d=noise_d)
            out[f'logsnr/shifted/image{image_d}_noise{noise_d}'] = f64(fn(t))
        fn = simple.logsnr_schedule_interpolated(simple.logsnr_schedule_cosine, image_d=image_d,
                                                 noise_d_low=32, noise_d_high=256)
        out[f'logsnr/interpolated/image{image_d}_low32_high256'] = f64(fn(t))

    # simple_diffusion.GaussianDiffusion helpers on fixed inputs.
    rng = np.random.default_rng(2002)
    x_start = rng.uniform(-1, 1, SHAPE)
    noise = rng.standard_normal(SHAPE)
    times = np.array([0.3, 0.85])
    model_pred = rng.standard_normal(SHAPE)
    x_t = rng.standard_normal(SHAPE)
    pmv_times = np.array([[1.0, 0.98], [0.5, 0.48], [0.02, 0.0]])
    out.update({'inputs/x_start': x_start, 'inputs/noise': noise, 'inputs/times': times,
                'inputs/model_pred': model_pred, 'inputs/x_t': x_t, 'inputs/pmv_times': pmv_times})
    configs = {'cosine': dict(image_size=4), 'interp128': dict(image_size=128, noise_d_low=32, noise_d_high=256)}
    for cname, ckw in configs.items():
        for objective in ('v', 'eps'):
            for minsnr in (True, False):
                gd = simple.GaussianDiffusion(FixedOutput(model_pred), channels=3, pred_objective=objective,
                                              min_snr_loss_weight=minsnr, min_snr_gamma=5, **ckw)
                if objective == 'v' and minsnr:
                    x_noised, log_snr = gd.q_sample(torch.from_numpy(x_start), torch.from_numpy(times),
                                                    noise=torch.from_numpy(noise))
                    out[f'{cname}/q_sample/x_noised'] = f64(x_noised)
                    out[f'{cname}/q_sample/log_snr'] = f64(log_snr)
                captured = {}

                def mse_loss(pred, target, reduction='mean'):
                    captured['target'] = target.clone()
                    return torch.nn.functional.mse_loss(pred, target, reduction=reduction)

                saved_F = simple.F
                simple.F = types.SimpleNamespace(mse_loss=mse_loss)   # records the regression target
                try:
                    losses = gd.p_losses(torch.from_numpy(x_start), torch.from_numpy(times),
                                         noise=torch.from_numpy(noise), loss_reduction='none')
                finally:
                    simple.F = saved_F
                key = f'{cname}/p_losses/{objective}/minsnr{"5" if minsnr else "off"}'
                out[key + '/target'] = f64(captured['target'])
                out[key + '/losses'] = f64(losses)
                if minsnr:
                    means, variances = [], []
                    for tm, tn in pmv_times:
                        m, v = gd.p_mean_variance(torch.from_numpy(x_t.copy()), torch.tensor(tm, dtype=torch.float64),
                                                  torch.tensor(tn, dtype=torch.float64))
                        assert m.dtype == torch.float64
                        means.append(f64(m))
                        variances.append(float(v))
                    out[f'{cname}/p_mean_variance/{objective}/model_mean'] = np.stack(means)
                    out[f'{cname}/p_mean_variance/{objective}/posterior_variance'] = np.array(variances)
    notes.update({
        'simple_diffusion_arg_names': {'logsnr_schedule_cosine': ['t', 'logsnr_min=-15', 'logsnr_max=15'],
                                       'logsnr_schedule_shifted': ['fn', 'image_d', 'noise_d'],
                                       'logsnr_schedule_interpolated': ['fn', 'image_d', 'noise_d_low',
                                                                        'noise_d_high']},
        'configs': {k: {kk: vv for kk, vv in v.items()} for k, v in configs.items()},
        'p_losses': "loss_reduction='none'; target captured by replacing simple_diffusion.F with a namespace "
                    "whose mse_loss records its target; min_snr_gamma 5; model returns inputs/model_pred",
        'p_mean_variance': 'x = inputs/x_t, time/time_next = inputs/pmv_times rows (0-d float64 tensors); '
                           'x_start is clamped to [-1, 1] inside',
        'sigmoid_default_f32': 'betas_default_f32: torch default dtype float32, so '
                               'torch.tensor(start / tau).sigmoid() and the end one are float32',
    })
    return out, notes


# ----------------------------------------------------------------------------- 3. k-diffusion

class GaussianDenoiser(torch.nn.Module):
    """Exact denoiser of data ~ N(mu, diag(s^2)): D(x; sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu)."""

    def __init__(self, mu, s):
        super().__init__()
        self.register_buffer('mu', torch.from_numpy(mu))
        self.register_buffer('s2', torch.from_numpy(s ** 2))
        self.calls = 0

    def forward(self, x, sigma):
        self.calls += 1
        sigma = sigma.reshape(-1, *([1] * (x.ndim - 1)))   # per-batch sigma, broadcast over the image
        return self.mu + self.s2 / (self.s2 + sigma ** 2) * (x - self.mu)


def kdiffusion(ksampling):
    rng = np.random.default_rng(3003)
    mu = rng.normal(0.0, 0.5, SHAPE[1:])
    s = rng.uniform(0.2, 1.5, SHAPE[1:])
    latents = rng.standard_normal(SHAPE)
    out = {'inputs/mu': mu, 'inputs/s': s, 'inputs/latents': latents}
    samplers = {'euler': ksampling.sample_euler, 'heun': ksampling.sample_heun,
                'dpmpp_2m': ksampling.sample_dpmpp_2m}
    for n in (5, 10, 20):
        with default_dtype(torch.float32):
            sig32 = ksampling.get_sigmas_karras(n, 0.002, 80., rho=7.)
            assert sig32.dtype == torch.float32
        with default_dtype(torch.float64):
            sigmas = ksampling.get_sigmas_karras(n, 0.002, 80., rho=7.)
            assert sigmas.dtype == torch.float64
            out[f'f32/karras/n{n}/sigmas'] = f64(sig32)
            out[f'f64/karras/n{n}/sigmas'] = f64(sigmas)
            x_init = sigmas[0] * torch.from_numpy(latents)
            out[f'n{n}/x_init'] = f64(x_init)
            for name, sampler in samplers.items():
                torch.manual_seed(0)   # euler/heun draw randn_like(x) each step; unused with s_churn = 0
                model = GaussianDenoiser(mu, s)
                traj = []
                kw = {'s_churn': 0.} if name in ('euler', 'heun') else {}
                x = sampler(model, x_init.clone(), sigmas, disable=True,
                            callback=lambda d: traj.append(f64(d['x'])), **kw)
                assert x.dtype == torch.float64
                out[f'n{n}/{name}/x_final'] = f64(x)
                if n <= 10:
                    out[f'n{n}/{name}/x_traj'] = np.stack(traj)
                out[f'n{n}/{name}/n_calls'] = np.array(model.calls, dtype=np.int64)
            sigma0 = float(sigmas[0])
            out[f'n{n}/exact_ode_x0'] = mu + np.sqrt(s ** 2 / (s ** 2 + sigma0 ** 2)) * (f64(x_init) - mu)
    notes = {'karras': 'get_sigmas_karras(n, 0.002, 80., rho=7.); f32 = default dtype float32 (stock), '
                       'f64 = torch.set_default_dtype(float64). Samplers use the f64 sigmas.',
             'samplers': 'sample_euler and sample_heun with s_churn=0, sample_dpmpp_2m; disable=True; '
                         'x_traj[i] = callback x at step i (before the update), stored for n <= 10.',
             'exact_ode_x0': 'computed here: mu + sqrt(s^2 / (s^2 + sigmas[0]^2)) (x_init - mu)'}
    return out, notes


# ----------------------------------------------------------------------------- 4. diffusers ScoreSdeVe

def score_sde_ve():
    Sched = scheduling_sde_ve.ScoreSdeVeScheduler
    cfg = dict(num_train_timesteps=1000, snr=0.16, sigma_min=0.01, sigma_max=50., sampling_eps=1e-5)
    rng = np.random.default_rng(4004)
    sample = rng.standard_normal(SHAPE) * 5.0
    score = rng.standard_normal(SHAPE) * np.array([1.0, 3.0]).reshape(2, 1, 1, 1)   # batch items differ in norm
    noise_pred = rng.standard_normal(SHAPE)
    noise_correct = rng.standard_normal(SHAPE)
    out = {'inputs/sample': sample, 'inputs/score': score, 'inputs/noise_pred': noise_pred,
           'inputs/noise_correct': noise_correct}
    notes = {'config': cfg, 'randn_tensor_calls': {}}
    for mode, dt in (('f32', torch.float32), ('f64', torch.float64)):
        with default_dtype(dt):
            for N in (1000, 100):
                s = Sched(**cfg)
                s.set_timesteps(N)
                s.set_sigmas(N, cfg['sigma_min'], cfg['sigma_max'], cfg['sampling_eps'])
                for name in ('timesteps', 'sigmas', 'discrete_sigmas'):
                    assert getattr(s, name).dtype == dt
                    out[f'{mode}/N{N}/{name}'] = f64(getattr(s, name))
                # g^2 used at each step: prev_sample_mean of step_pred(ones, t_i, zeros), zero noise.
                one = torch.ones(1, 1, 1, 1, dtype=torch.float64)
                with NoiseFeed(scheduling_sde_ve, np.zeros((1, 1, 1, 1))):
                    g2 = [float(s.step_pred(one, s.timesteps[i], torch.zeros_like(one)).prev_sample_mean)
                          for i in range(N)]
                out[f'{mode}/N{N}/step_pred_g2'] = np.array(g2)
                idx = [0, 1, N // 2, N - 1]
                prevs, means = [], []
                with NoiseFeed(scheduling_sde_ve, nchw(noise_pred).numpy()) as feed:
                    for i in idx:
                        r = s.step_pred(nchw(score), s.timesteps[i], nchw(sample))
                        prevs.append(nhwc(r.prev_sample))
                        means.append(nhwc(r.prev_sample_mean))
                key = f'{mode}/N{N}/step_pred'
                notes['randn_tensor_calls'][key] = feed.calls
                out[key + '/i_values'] = np.array(idx, dtype=np.int64)
                out[key + '/timestep'] = f64(s.timesteps[idx])
                out[key + '/prev_sample'] = np.stack(prevs)
                out[key + '/prev_sample_mean'] = np.stack(means)
            with NoiseFeed(scheduling_sde_ve, nchw(noise_correct).numpy()) as feed:
                r = s.step_correct(nchw(score), nchw(sample))
            notes['randn_tensor_calls'][f'{mode}/step_correct'] = feed.calls
            out[f'{mode}/step_correct/prev_sample'] = nhwc(r.prev_sample)
    notes.update({
        'order': 'Sched(**config); set_timesteps(N); set_sigmas(N, sigma_min, sigma_max, sampling_eps) '
                 '(as ScoreSdeVePipeline does)',
        'noise': 'randn_tensor patched in diffusers.schedulers.scheduling_sde_ve: step_pred makes 1 call '
                 '(dtype = sample dtype), step_correct 1 call with dtype=None (= default dtype, so float32 '
                 'in f32 mode: the noise is rounded to float32 there).',
        'step_correct_norms': 'grad_norm and noise_norm are per-sample L2 norms over all non-batch axes, '
                              'then .mean() over the batch: one step size for the whole batch; independent '
                              'of the timestep, so recorded once per mode (from the N=100 scheduler).',
        'step_pred_index': 'step_pred uses discrete_sigmas[long(timestep * (len(timesteps) - 1))] and the '
                           'one before it (0 at index 0), not sigmas[i].',
    })
    return out, notes


# ----------------------------------------------------------------------------- main

def save(name, arrays, notes):
    OUT.mkdir(parents=True, exist_ok=True)
    arrays = dict(arrays)
    for k, v in arrays.items():
        v = np.asarray(v)
        if v.dtype.kind == 'f':
            v = v.astype(np.float64)
        elif v.dtype.kind in 'iu':
            v = v.astype(np.int64)
        arrays[k] = v
    arrays['meta/json'] = meta(notes)
    path = OUT / f'{name}.npz'
    np.savez_compressed(path, **arrays)
    print(f'{path.relative_to(OUT.parents[2])}: {len(arrays)} arrays, {path.stat().st_size / 1024:.1f} KiB')


def main():
    found = versions()
    for pkg, want in EXPECTED_VERSIONS.items():
        if found[pkg] != want:
            print(f'WARNING: {pkg} {found[pkg]} installed, the stored files were made with {want}')
    torch.manual_seed(0)
    ddp, simple, ksampling = import_stubbed_references()
    save('diffusers_ddpm', *diffusers_ddpm())
    save('ddpm_pytorch_schedules', *ddpm_pytorch_schedules(ddp, simple))
    save('kdiffusion', *kdiffusion(ksampling))
    save('diffusers_score_sde_ve', *score_sde_ve())
    print('versions:', ', '.join(f'{k} {v}' for k, v in found.items()))


if __name__ == '__main__':
    main()
