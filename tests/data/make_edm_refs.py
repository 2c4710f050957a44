"""Slice the EDM reference arrays in ../shared/refs/edm into the small files under tests/data/edm/.

The shared files were made by running NVlabs/edm's own code (commit 008a4e5) on small random
networks (see ../shared/refs/edm/README.md). The tests only need: the parameters (float32), the
inputs and draws, and the outputs of every denoiser / loss / sampler run in both precisions. The
per-module activations and the per-step trajectories are dropped to keep the repository small.

        python tests/data/make_edm_refs.py [--refs ../shared/refs/edm]
"""
import argparse
import pathlib

import numpy as np

NETS = ('ddpmpp', 'ncsnpp', 'adm', 'adm_iddpm', 'ddpmpp_cond', 'adm_cond')
DROPPED = ('/x_cur', '/call_x', '/call_D')


def keep(key: str) -> bool:
    if key.startswith('f64/acts/'):
        return False
    return not key.endswith(DROPPED)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    here = pathlib.Path(__file__).resolve().parent
    parser.add_argument('--refs', default=str(here.parents[1] / '..' / 'shared' / 'refs' / 'edm'))
    parser.add_argument('--out', default=str(here / 'edm'))
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for net in NETS:
        src = np.load(pathlib.Path(args.refs) / f'{net}.npz')
        arrays = {k: src[k] for k in src.files if keep(k)}
        np.savez_compressed(out / f'{net}.npz', **arrays)
        size = (out / f'{net}.npz').stat().st_size
        print(f'{net}: {len(arrays)} arrays, {size / 1e6:.1f} MB')


if __name__ == '__main__':
    main()
