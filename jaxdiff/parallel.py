"""Devices, meshes and shardings: one code path from one CPU to a multi-host TPU pod.

The mesh has two axes, ('data', 'fsdp'). The batch is split over both (every device sees a
different slice of it); parameters and optimiser state are replicated over 'data' and, when
the 'fsdp' axis has more than one device, split over it along their largest divisible axis.
`jax.jit` with these shardings inserts the collectives; there is no pmap.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ('data', 'fsdp')


def initialize_distributed() -> None:
    """Join a multi-process run when launched as one (`jax.distributed.initialize()` finds the
    coordinator from the cluster environment: TPU pods, SLURM, or JAX_COORDINATOR_ADDRESS /
    JAX_NUM_PROCESSES / JAX_PROCESS_ID set by hand). A single process does nothing."""
    explicit = 'JAX_COORDINATOR_ADDRESS' in os.environ
    cluster = any(k in os.environ for k in ('SLURM_JOB_ID', 'TPU_WORKER_HOSTNAMES', 'MEGASCALE_COORDINATOR_ADDRESS'))
    if explicit:
        jax.distributed.initialize(coordinator_address=os.environ['JAX_COORDINATOR_ADDRESS'],
                                   num_processes=int(os.environ['JAX_NUM_PROCESSES']),
                                   process_id=int(os.environ['JAX_PROCESS_ID']))
    elif cluster:
        jax.distributed.initialize()


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
    """A ('data', 'fsdp') mesh; -1 on one axis takes all remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    if data == -1 and fsdp == -1:
        raise ValueError('mesh.data and mesh.fsdp cannot both be -1')
    if data == -1:
        data = n // fsdp if fsdp > 0 else 0
    if fsdp == -1:
        fsdp = n // data if data > 0 else 0
    if data < 1 or fsdp < 1 or data * fsdp != n:
        raise ValueError(f'mesh.data * mesh.fsdp must equal the {n} devices, got data={data}, fsdp={fsdp}')
    return Mesh(np.asarray(devices).reshape(data, fsdp), ('data', 'fsdp'))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every device of the mesh."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_spec(shape, fsdp_size: int) -> P:
    """Split the largest axis divisible by the 'fsdp' size over 'fsdp'; replicate the rest."""
    if fsdp_size > 1:
        for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
            if shape[axis] % fsdp_size == 0:
                spec = [None] * len(shape)
                spec[axis] = 'fsdp'
                return P(*spec)
    return P()


def state_shardings(mesh: Mesh, abstract_state):
    """NamedShardings for every leaf of a (train) state pytree of arrays or ShapeDtypeStructs."""
    fsdp_size = mesh.shape['fsdp']
    return jax.tree.map(lambda leaf: NamedSharding(mesh, fsdp_spec(np.shape(leaf), fsdp_size)), abstract_state)


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
    """The global batch must split evenly over devices and processes."""
    if int(global_batch_size) != global_batch_size or global_batch_size < 1:
        raise ValueError(f'train.batch_size must be a positive integer, got {global_batch_size}')
    if global_batch_size % mesh.size:
        raise ValueError(f'train.batch_size={global_batch_size} is not divisible by the {mesh.size} devices')
    if global_batch_size % jax.process_count():
        raise ValueError(f'train.batch_size={global_batch_size} is not divisible by the '
                         f'{jax.process_count()} processes')


def global_batch(mesh: Mesh, local_batch: dict) -> dict:
    """Assemble each process's local slice of the batch into global arrays sharded over the mesh."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}
