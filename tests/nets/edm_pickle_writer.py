"""Write pickles shaped like NVlabs/edm network snapshots, in pure Python (no torch, no EDM code).

The tests of `jaxdiff.nets.edm_pickle` need EDM pickles without depending on torch, and the
project must not contain EDM's source code. This module writes the same opcode structure as
`pickle.dump(dict(ema=net, ...))` of an EDM network under torch 2.x, with the same global names:

  persistent class instance  REDUCE(torch_utils.persistence._reconstruct_persistent_obj,
                                    ({type, version, module_src, class_name, state},))
  torch container module     NEWOBJ(torch.nn.modules.container.ModuleDict) + BUILD(state)
  parameter                  REDUCE(torch._utils._rebuild_parameter, (tensor, False, OrderedDict()))
  tensor                     REDUCE(torch._utils._rebuild_tensor_v2,
                                    (storage, offset, size, stride, False, OrderedDict()))
  storage                    REDUCE(torch.storage._load_from_bytes, (torch.save blob,))

`module_src` is a placeholder unless the caller passes real source (only done outside the
project, to check that real `pickle.load` with EDM accepts what this module writes). The
storage blob is written in torch's legacy `torch.save` format, as torch does for pickled
storages, or in its zip format.

Globals are emitted by name from `Ref` markers through the pure-Python pickler, so no fake
`torch` module has to be registered in `sys.modules`.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import io
import pickle
import zipfile
from typing import Any

import numpy as np

PLACEHOLDER_SRC = '# Placeholder for the source code of the module that defined this class.\n'
PERSISTENCE_VERSION = 6  # torch_utils.persistence's format number.
LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
LEGACY_PROTOCOL = 1001

# Attributes every torch 2.x Module has in its __dict__, in order, besides the parameters,
# buffers and submodules: empty hook dicts and flags.
_HOOK_DICTS_1 = ('_backward_pre_hooks', '_backward_hooks')
_HOOK_DICTS_2 = ('_forward_hooks', '_forward_hooks_with_kwargs', '_forward_hooks_always_called',
                 '_forward_pre_hooks', '_forward_pre_hooks_with_kwargs', '_state_dict_hooks',
                 '_state_dict_pre_hooks', '_load_state_dict_pre_hooks',
                 '_load_state_dict_post_hooks')
MODULE_BOILERPLATE = frozenset(
    ('training', '_parameters', '_buffers', '_non_persistent_buffers_set',
     '_is_full_backward_hook', '_modules') + _HOOK_DICTS_1 + _HOOK_DICTS_2)

_STORAGE_NAMES = {
    'float32': 'FloatStorage', 'float64': 'DoubleStorage', 'float16': 'HalfStorage',
    'int64': 'LongStorage', 'int32': 'IntStorage', 'int16': 'ShortStorage', 'int8': 'CharStorage',
    'uint8': 'ByteStorage', 'bool': 'BoolStorage', 'bfloat16': 'BFloat16Storage',
}


@dataclasses.dataclass(frozen=True)
class Ref:
    """A global name to write as such (the object itself need not exist)."""
    module: str
    name: str

    def __call__(self, *args):  # pickle's save_reduce insists on a callable.
        raise TypeError(f'{self.module}.{self.name} is only a name to pickle')


_EASYDICT = Ref('dnnlib.util', 'EasyDict')
RECONSTRUCT = Ref('torch_utils.persistence', '_reconstruct_persistent_obj')
REBUILD_TENSOR = Ref('torch._utils', '_rebuild_tensor_v2')
REBUILD_PARAMETER = Ref('torch._utils', '_rebuild_parameter')
LOAD_FROM_BYTES = Ref('torch.storage', '_load_from_bytes')


class EasyDict(dict):
    """Pickles as `dnnlib.util.EasyDict` (a dict subclass: NEWOBJ, then SETITEMS)."""


@dataclasses.dataclass(eq=False)
class Storage:
    """A torch storage: a flat array, saved as a torch.save blob in format `fmt`: 'legacy',
    'zip' or 'zip-big' (zip with big-endian data, as torch writes on big-endian machines)."""
    array: np.ndarray
    fmt: str = 'legacy'
    key: str = '0'


@dataclasses.dataclass(eq=False)
class Tensor:
    """A strided view of a storage; `parameter` wraps it as torch.nn.Parameter."""
    storage: Storage
    offset: int
    shape: tuple
    stride: tuple
    parameter: bool = True


@dataclasses.dataclass(eq=False)
class _TensorData:
    tensor: Tensor  # The plain tensor inside a Parameter's reduce arguments.


def tensor(array, parameter: bool = True, fmt: str = 'legacy') -> Tensor:
    """A C-contiguous tensor on its own storage holding `array`."""
    array = np.ascontiguousarray(array)
    strides = tuple(s // array.itemsize for s in array.strides)
    return Tensor(Storage(array.reshape(-1), fmt), 0, array.shape, strides, parameter)


@dataclasses.dataclass(eq=False)
class Module:
    """A torch module: a persistent EDM class, or (persistent=False) a torch ModuleDict."""
    class_name: str
    params: dict = dataclasses.field(default_factory=dict)
    buffers: dict = dataclasses.field(default_factory=dict)
    children: dict = dataclasses.field(default_factory=dict)
    attrs: dict = dataclasses.field(default_factory=dict)
    init_args: tuple = ()
    init_kwargs: dict | None = dataclasses.field(default_factory=dict)
    persistent: bool = True
    module_src: str = PLACEHOLDER_SRC
    non_persistent_buffers: frozenset = frozenset()

    def state(self) -> dict:
        """The module's __dict__ in the order torch 2.x builds it."""
        od = collections.OrderedDict
        state: dict[str, Any] = {'training': False, '_parameters': dict(self.params),
                                 '_buffers': dict(self.buffers),
                                 '_non_persistent_buffers_set': set(self.non_persistent_buffers)}
        state.update({name: od() for name in _HOOK_DICTS_1})
        state['_is_full_backward_hook'] = None
        state.update({name: od() for name in _HOOK_DICTS_2})
        state['_modules'] = dict(self.children)
        state.update(self.attrs)
        if self.persistent:
            state['_init_args'] = self.init_args
            state['_init_kwargs'] = self.init_kwargs
        return state


@dataclasses.dataclass(eq=False)
class PersistentObject:
    """A persistent EDM class that is not a torch module (EDMLoss, AugmentPipe)."""
    class_name: str
    attrs: dict = dataclasses.field(default_factory=dict)
    init_args: tuple = ()
    init_kwargs: dict = dataclasses.field(default_factory=dict)
    module_src: str = PLACEHOLDER_SRC

    def state(self) -> dict:
        return {**self.attrs, '_init_args': self.init_args, '_init_kwargs': self.init_kwargs}


class _Pickler(pickle._Pickler):  # The pure-Python pickler lets us emit globals by name.
    """Pickles Ref/Storage/Tensor/Module/PersistentObject the way torch and EDM pickle theirs."""

    dispatch = dict(pickle._Pickler.dispatch)

    def __init__(self, file, protocol, storage_pid=None):
        super().__init__(file, protocol)
        self._storage_pid = storage_pid

    def persistent_id(self, obj):
        if self._storage_pid is not None and obj is self._storage_pid[0]:
            return self._storage_pid[1]
        return None

    def _save_ref(self, ref: Ref):
        if self.proto >= 4:
            self.save(ref.module)
            self.save(ref.name)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + f'{ref.module}\n{ref.name}\n'.encode('ascii'))
        self.memoize(ref)

    def _save_storage(self, storage: Storage):
        blob = (_legacy_blob if storage.fmt == 'legacy' else _zip_blob)(storage)
        self.save_reduce(LOAD_FROM_BYTES, (blob,), obj=storage)

    def _save_tensor(self, t: Tensor):
        if t.parameter:
            hooks = collections.OrderedDict()
            self.save_reduce(REBUILD_PARAMETER, (_TensorData(t), False, hooks), obj=t)
        else:
            self.save_reduce(REBUILD_TENSOR, _tensor_args(t), obj=t)

    def _save_data(self, data: _TensorData):
        self.save_reduce(REBUILD_TENSOR, _tensor_args(data.tensor), obj=data)

    def _save_persistent(self, obj):
        meta = dict(type='class', version=PERSISTENCE_VERSION, module_src=obj.module_src,
                    class_name=obj.class_name, state=obj.state())
        self.save_reduce(RECONSTRUCT, (meta,), obj=obj)

    def _save_module(self, module: Module):
        if module.persistent:
            return self._save_persistent(module)
        # A plain torch module pickles through copyreg.__newobj__: NEWOBJ, then BUILD.
        self.save(_container_ref(module.class_name))
        self.save(())
        self.write(pickle.NEWOBJ)
        self.memoize(module)
        self.save(module.state())
        self.write(pickle.BUILD)

    def _save_easydict(self, obj: EasyDict):
        self.save(_EASYDICT)
        self.save(())
        self.write(pickle.NEWOBJ)
        self.memoize(obj)
        self._batch_setitems(iter(obj.items()))

    dispatch[Ref] = _save_ref
    dispatch[EasyDict] = _save_easydict
    dispatch[Storage] = _save_storage
    dispatch[Tensor] = _save_tensor
    dispatch[_TensorData] = _save_data
    dispatch[Module] = _save_module
    dispatch[PersistentObject] = _save_persistent


@functools.lru_cache(maxsize=None)
def _container_ref(name: str) -> Ref:
    # One object per name, so that the pickle memo reuses it as torch's pickle reuses the class.
    return Ref('torch.nn.modules.container', name)


def _tensor_args(t: Tensor) -> tuple:
    return (t.storage, t.offset, tuple(t.shape), tuple(t.stride), False,
            collections.OrderedDict())


def _storage_pid(storage: Storage) -> tuple:
    name = _STORAGE_NAMES[str(storage.array.dtype)]
    return ('storage', Ref('torch', name), storage.key, 'cpu', storage.array.size)


def _legacy_blob(storage: Storage) -> bytes:
    """torch's legacy `torch.save(storage)`: 3 header pickles, the object, keys, raw data."""
    out = io.BytesIO()
    sys_info = dict(protocol_version=LEGACY_PROTOCOL, little_endian=True,
                    type_sizes=dict(short=2, int=4, long=4))
    for header in (LEGACY_MAGIC, LEGACY_PROTOCOL, sys_info):
        pickle.dump(header, out, protocol=2)
    marker = object()
    _Pickler(out, 2, (marker, _storage_pid(storage) + (None,))).dump(marker)
    pickle.dump([storage.key], out, protocol=2)
    array = storage.array
    out.write(int(array.size).to_bytes(8, 'little', signed=True))
    out.write(array.astype(array.dtype.newbyteorder('<')).tobytes())
    return out.getvalue()


def _zip_blob(storage: Storage) -> bytes:
    """torch's zip `torch.save(storage)`: data.pkl naming the storage, kept in data/<key>."""
    pkl = io.BytesIO()
    marker = object()
    _Pickler(pkl, 2, (marker, _storage_pid(storage))).dump(marker)
    out = io.BytesIO()
    order = 'big' if storage.fmt == 'zip-big' else 'little'
    array = storage.array
    if array.dtype.itemsize > 1:
        array = array.astype(array.dtype.newbyteorder('>' if order == 'big' else '<'))
    with zipfile.ZipFile(out, 'w', zipfile.ZIP_STORED) as zf:
        zf.writestr('archive/data.pkl', pkl.getvalue())
        zf.writestr('archive/byteorder', order)
        zf.writestr(f'archive/data/{storage.key}', array.tobytes())
        zf.writestr('archive/version', '3\n')
    return out.getvalue()


def dump(obj, file, protocol: int = 4) -> None:
    """Pickle `obj` (e.g. a snapshot dict) to a binary file; EDM's pickles use protocol 4."""
    _Pickler(file, protocol).dump(obj)


def dumps(obj, protocol: int = 4) -> bytes:
    out = io.BytesIO()
    dump(obj, out, protocol)
    return out.getvalue()


# ---------------------------------------------------------------------------------------------
# Building a module tree from a flat state dict.
# ---------------------------------------------------------------------------------------------

BUFFER_NAMES = frozenset(('resample_filter', 'freqs', 'u'))
CONTAINER_NAMES = frozenset(('enc', 'dec'))


def _guess_class(module: Module) -> str:
    """A plausible EDM class name for a leaf module (the loader does not depend on it)."""
    weight = module.params.get('weight')
    if 'freqs' in module.buffers:
        return 'FourierEmbedding'
    if weight is None:
        return 'Conv2d' if 'resample_filter' in module.buffers else 'UNetBlock'
    return {4: 'Conv2d', 2: 'Linear', 1: 'GroupNorm'}[len(weight.shape)]


def module_tree(state_dict: dict, fmt: str = 'legacy') -> dict:
    """Module nodes for a flat `model.<...>` state dict: returns the root's children dict."""
    root = Module('root')
    for key, array in state_dict.items():
        *path, leaf = key.split('.')
        node = root
        for depth, name in enumerate(path):
            if name not in node.children:
                container = depth == 1 and name in CONTAINER_NAMES
                node.children[name] = Module('ModuleDict' if container else 'Module',
                                             persistent=not container)
            node = node.children[name]
        group = node.buffers if leaf in BUFFER_NAMES else node.params
        group[leaf] = tensor(array, parameter=leaf not in BUFFER_NAMES, fmt=fmt)
    _name_classes(root)
    return root


def _name_classes(node: Module) -> None:
    for child in node.children.values():
        _name_classes(child)
        if child.persistent and child.class_name == 'Module':
            child.class_name = 'UNetBlock' if child.children else _guess_class(child)


def edm_network(precond: str, precond_attrs: dict, precond_init_kwargs: dict, model_type: str,
                model_init_kwargs: dict, state_dict: dict, fmt: str = 'legacy') -> Module:
    """An EDM Precond wrapping `model_type`, holding `state_dict` (keys `model.<...>`, `u`)."""
    root = module_tree(state_dict, fmt)
    net = Module(precond, params=root.params, buffers=root.buffers, children=root.children,
                 attrs=dict(precond_attrs), init_kwargs=dict(precond_init_kwargs))
    model = net.children['model']
    model.class_name = model_type
    model.init_kwargs = dict(model_init_kwargs)
    return net


def snapshot(net) -> dict:
    """The dict EDM's training loop pickles as `network-snapshot-*.pkl`."""
    loss_fn = PersistentObject('EDMLoss', attrs=dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5))
    dataset_kwargs = dict(class_name='training.dataset.ImageFolderDataset', path='data.zip',
                          use_labels=False, xflip=False, cache=True, resolution=16, max_size=4)
    return dict(ema=net, loss_fn=loss_fn, augment_pipe=None, dataset_kwargs=dataset_kwargs)
