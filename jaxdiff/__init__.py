"""jaxdiff: diffusion models in JAX/Flax from pure functions (see README.md).

Importing jaxdiff before JAX starts its CPU backend turns off XLA:CPU's YNNPACK fusions
(`--xla_cpu_experimental_ynn_fusion_type=`, appended to XLA_FLAGS unless that flag is already
there): in jaxlib 0.10 they ran the digits network's convolutions on one core, and the
training step of the digits preset ran 1.5-2x faster on 2 cores without them
(benchmarks/RESULTS.md). It changes nothing on GPU/TPU. Set JAXDIFF_KEEP_XLA_FLAGS=1 to opt out.
"""
import os as _os

_YNN_FLAG = '--xla_cpu_experimental_ynn_fusion_type'
if not _os.environ.get('JAXDIFF_KEEP_XLA_FLAGS') and _YNN_FLAG not in _os.environ.get('XLA_FLAGS', ''):
    _os.environ['XLA_FLAGS'] = (_os.environ.get('XLA_FLAGS', '') + f' {_YNN_FLAG}=').strip()
