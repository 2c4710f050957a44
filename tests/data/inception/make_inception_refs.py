"""Record pytorch-fid's FID Inception-v3 outputs for tests/nets/test_inception.py.

Run once, outside the project's environment, in a CPU-only torch environment:

    python -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch==2.13.0  # CPU build
    /tmp/torchenv/bin/pip install --no-deps pytorch-fid==0.3.0 torchvision==0.28.0
    /tmp/torchenv/bin/python tests/data/inception/make_inception_refs.py

Recorded with Python 3.11, torch 2.13.0+cpu, torchvision 0.28.0 (the PyPI wheel; its compiled
detection ops need CUDA torch libraries and fail to load under a CPU torch, which breaks
`import torchvision` in its fake-tensor registrations for those ops: this script stubs
`torchvision._meta_registrations`, which nothing here uses; Inception3 is plain Python),
pytorch-fid 0.3.0, numpy 2.4.6. The versions actually used are stored in the output's metadata.

What it does:
1. Builds pytorch-fid's `InceptionV3([3], resize_input=True, normalize_input=True,
   use_fid_inception=True)` without downloading: `load_state_dict_from_url` is replaced by a
   function returning the seeded random state dict of random_weights.py, drawn for the names
   and shapes of the same torchvision skeleton `fid_inception_v3` builds (its strict
   `load_state_dict` then confirms them). `fid_inception_v3` is wrapped to keep the network
   it builds, whose `fc` (2048 -> 1008) gives the logits from the pool features.
2. Runs it in eval mode on seeded uint8 images of several sizes, fed as pytorch-fid's data
   loader feeds them: contiguous NCHW float32 x / 255. Records pool3 [N, 2048] and logits
   [N, 1008], in float32 and (network and input cast to float64) float64.
3. Records `F.interpolate(mode='bilinear', align_corners=False)` on seeded float32 inputs for
   up-, down- and mixed resizes, including 32x32 -> 299x299.
4. Checks that jaxdiff's torch-free reader (`jaxdiff.nets.edm_pickle.load_torch_state_dict`)
   reads the random state dict back exactly from `torch.save` files in both the zip and the
   legacy format.

Output: tests/data/inception/inception_refs.npz, image arrays NHWC:
    meta/json                  versions, seed, weight digest, state-dict names and shapes
    images/<group>             uint8 [N, H, W, 3] inputs; groups s32, s64, s40x56, s299
    f32/pool/<group>, f32/logits/<group>, f64/pool/<group>, f64/logits/<group>
    resize/<case>/in, resize/<case>/out   float32 [N, H, W, C], case = '<h>x<w>_to_<H>x<W>'
"""
import copy
import json
import pathlib
import platform
import sys
import tempfile
import types

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[2]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# See the docstring: the CUDA-built compiled ops of the PyPI wheel fail to load under a CPU
# torch, and importing torchvision then fails in their fake-tensor registrations.
sys.modules['torchvision._meta_registrations'] = types.ModuleType('torchvision._meta_registrations')
import torchvision  # noqa: E402
import pytorch_fid  # noqa: E402
import pytorch_fid.inception as pfi  # noqa: E402

import random_weights  # noqa: E402
from jaxdiff.nets.edm_pickle import load_torch_state_dict  # noqa: E402  (numpy only)

IMAGE_SEED = 1
GROUPS = {'s32': (4, 32, 32), 's64': (2, 64, 64), 's40x56': (1, 40, 56), 's299': (1, 299, 299)}
RESIZE_CASES = [((32, 32), (299, 299), 1, 1), ((5, 7), (11, 13), 2, 3), ((37, 41), (12, 9), 2, 3),
                ((8, 8), (3, 5), 1, 2), ((1, 1), (4, 3), 1, 2), ((3, 300), (7, 299), 1, 2),
                ((6, 6), (6, 6), 1, 3), ((6, 7), (6, 12), 1, 3), ((64, 48), (20, 96), 1, 3)]


def build_reference():
    skeleton = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    state_dict = random_weights.random_state_dict(shapes)
    built = {}
    original = pfi.fid_inception_v3

    def keep_network():
        built['net'] = original()
        return built['net']

    pfi.load_state_dict_from_url = lambda *args, **kwargs: {
        k: torch.from_numpy(v) for k, v in state_dict.items()}
    pfi.fid_inception_v3 = keep_network
    model = pfi.InceptionV3([3], resize_input=True, normalize_input=True,
                            use_fid_inception=True).eval()
    return model, built['net'].fc.eval(), shapes, state_dict


def features(model, fc, images_u8, dtype):
    x = torch.from_numpy(images_u8).permute(0, 3, 1, 2).contiguous().to(dtype) / 255
    with torch.no_grad():
        pool = model(x)[0].flatten(1)
        logits = fc(pool)
    return pool.numpy(), logits.numpy()


def check_reader(state_dict):
    with tempfile.TemporaryDirectory() as tmp:
        for zip_format in (True, False):
            path = pathlib.Path(tmp) / f'sd_{zip_format}.pth'
            torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, path,
                       _use_new_zipfile_serialization=zip_format)
            back = load_torch_state_dict(path)
            assert list(back) == list(state_dict)
            assert all(np.array_equal(back[k], v) and back[k].dtype == v.dtype
                       for k, v in state_dict.items())
    return ['zip', 'legacy']


def main():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    model, fc, shapes, state_dict = build_reference()
    model64, fc64 = copy.deepcopy(model).double(), copy.deepcopy(fc).double()
    out = {}
    rng = np.random.default_rng(IMAGE_SEED)
    for group, (n, h, w) in GROUPS.items():
        images = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
        out[f'images/{group}'] = images
        out[f'f32/pool/{group}'], out[f'f32/logits/{group}'] = features(
            model, fc, images, torch.float32)
        out[f'f64/pool/{group}'], out[f'f64/logits/{group}'] = features(
            model64, fc64, images, torch.float64)
    for (h, w), (oh, ow), n, c in RESIZE_CASES:
        x = rng.random((n, c, h, w), dtype=np.float32)
        y = F.interpolate(torch.from_numpy(x), size=(oh, ow), mode='bilinear',
                          align_corners=False).numpy()
        case = f'{h}x{w}_to_{oh}x{ow}'
        out[f'resize/{case}/in'] = x.transpose(0, 2, 3, 1)
        out[f'resize/{case}/out'] = y.transpose(0, 2, 3, 1)
    meta = dict(
        python=platform.python_version(), torch=torch.__version__,
        torchvision=torchvision.__version__, pytorch_fid=pytorch_fid.__version__,
        numpy=np.__version__, seed=random_weights.SEED, image_seed=IMAGE_SEED,
        weights_sha256=random_weights.state_dict_digest(state_dict),
        state_dict_shapes={k: list(v) for k, v in shapes.items()},
        reader_checked_formats=check_reader(state_dict),
        command='/tmp/torchenv/bin/python tests/data/inception/make_inception_refs.py')
    out['meta/json'] = np.array(json.dumps(meta))
    np.savez_compressed(HERE / 'inception_refs.npz', **out)
    for group in GROUPS:
        pool, logits = out[f'f32/pool/{group}'], out[f'f32/logits/{group}']
        print(group, 'pool |max|', np.abs(pool).max(), 'mean', pool.mean(),
              'logits |max|', np.abs(logits).max(),
              'f32 vs f64', np.abs(pool - out[f'f64/pool/{group}']).max() / np.abs(pool).max())
    print({k: v for k, v in meta.items() if k != 'state_dict_shapes'})


if __name__ == '__main__':
    main()
