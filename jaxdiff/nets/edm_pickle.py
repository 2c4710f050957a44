"""Read NVlabs/edm network pickles (`network-snapshot-*.pkl`) without torch and without running.

EDM writes its snapshots with a plain `pickle.dump(dict(ema=net, loss_fn=..., augment_pipe=...,
dataset_kwargs=...))`. Every EDM network class is a `torch_utils.persistence` class, so each
module pickles as a call `torch_utils.persistence._reconstruct_persistent_obj(meta)` where `meta`
carries the *source code* of the module that defined the class, the class name and the object's
`__dict__` (parameters, buffers, submodules, plain attributes and the recorded constructor
arguments `_init_args` / `_init_kwargs`). Loading such a file with `pickle.load` executes that
source code, and any pickle can run arbitrary code through its globals.

This module therefore never calls `pickle.load` on the file. It uses an unpickler whose
`find_class` resolves only a fixed whitelist of global names, each mapped to a small stand-in
written here (numpy based); any other global (`os.system`, `builtins.eval`, an unknown class)
stops the load with an `EDMPickleError` naming it. The embedded source code is dropped unread;
only the class name, the state and the recorded constructor arguments are used.

Tensors pickle through torch's reducers: `torch._utils._rebuild_tensor_v2(storage, offset, size,
stride, ...)` (wrapped in `_rebuild_parameter` for parameters), where `storage` is
`torch.storage._load_from_bytes(blob)` and `blob` is a `torch.save` of the storage alone. torch
writes that blob in its legacy (non-zip) format; the zip format is read too, in case another
writer used it. Both are parsed here with their own restricted unpicklers.

`load_torch_state_dict` reads the other common torch file, a plain `torch.save(state_dict)`
(zip or legacy format), with the same readers and a whitelist without EDM's names.
"""
from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import zipfile
from typing import Any, BinaryIO, Callable

import numpy as np

__all__ = ['EDMPickle', 'EDMPickleError', 'load_edm_pickle', 'load_torch_state_dict',
           'PRECOND_PARAMS', 'MODEL_PARAMS']


class EDMPickleError(pickle.UnpicklingError, ValueError):
    """The file is not a readable, plain NVlabs/edm network pickle."""


# Constructor parameters of EDM's preconditioners, in signature order (`model_type` and the
# `**model_kwargs` that are forwarded to the inner network are reported separately).
PRECOND_PARAMS = {
    'EDMPrecond': ('img_resolution', 'img_channels', 'label_dim', 'use_fp16',
                   'sigma_min', 'sigma_max', 'sigma_data'),
    'VPPrecond': ('img_resolution', 'img_channels', 'label_dim', 'use_fp16',
                  'beta_d', 'beta_min', 'M', 'epsilon_t'),
    'VEPrecond': ('img_resolution', 'img_channels', 'label_dim', 'use_fp16',
                  'sigma_min', 'sigma_max'),
    'iDDPMPrecond': ('img_resolution', 'img_channels', 'label_dim', 'use_fp16',
                     'C_1', 'C_2', 'M'),
}

# Constructor parameters of EDM's networks in signature order; used only to name positional
# arguments, should a pickle have recorded any (EDM itself passes everything by keyword).
_UNET_COMMON = ('img_resolution', 'in_channels', 'out_channels', 'label_dim', 'augment_dim',
                'model_channels', 'channel_mult', 'channel_mult_emb', 'num_blocks',
                'attn_resolutions', 'dropout', 'label_dropout')
MODEL_PARAMS = {
    'SongUNet': _UNET_COMMON + ('embedding_type', 'channel_mult_noise', 'encoder_type',
                                'decoder_type', 'resample_filter'),
    'DhariwalUNet': _UNET_COMMON,
}


@dataclasses.dataclass(frozen=True)
class EDMPickle:
    """The network found in an EDM pickle, as plain Python and numpy data.

    precond:        preconditioner class name: 'EDMPrecond', 'VPPrecond', 'VEPrecond' or
                    'iDDPMPrecond'.
    precond_kwargs: its constructor arguments (recorded ones, completed from the object's
                    attributes for those left at their defaults); without `model_type`.
    model_type:     the wrapped network's class name ('SongUNet' or 'DhariwalUNet').
    model_kwargs:   the network's constructor arguments exactly as recorded by EDM's
                    persistence (these include img_resolution, in_channels, out_channels, ...).
    state_dict:     `net.state_dict()` of the preconditioner as numpy arrays, in torch's order:
                    keys `model.<...>` plus preconditioner buffers such as iDDPMPrecond's `u`.
    """
    precond: str
    precond_kwargs: dict
    model_type: str
    model_kwargs: dict
    state_dict: dict = dataclasses.field(repr=False)  # Printing every weight helps nobody.


# ---------------------------------------------------------------------------------------------
# Stand-ins for the whitelisted globals.
# ---------------------------------------------------------------------------------------------

class _Inert:
    """Base of the stand-in objects: a pickle may not set their attributes via BUILD."""
    __slots__ = ()

    def __setstate__(self, state):
        raise EDMPickleError(f'unexpected state for {type(self).__name__} in the pickle')


class _Global(_Inert):
    """A whitelisted callable global, wrapped so that BUILD cannot modify the function itself."""
    __slots__ = ('qualname', 'fn')

    def __init__(self, qualname: str, fn: Callable):
        self.qualname = qualname
        self.fn = fn

    def __call__(self, *args):
        return self.fn(*args)

    def __repr__(self):
        return f'<stand-in for {self.qualname}>'


class _Storage(_Inert):
    """A torch storage: a flat numpy array of its elements."""
    __slots__ = ('array',)

    def __init__(self, array: np.ndarray):
        self.array = array


class _StorageType(_Inert):
    """A torch storage class (`torch.FloatStorage`, ...), known by its element dtype."""
    __slots__ = ('name', 'dtype_name')

    def __init__(self, name: str, dtype_name: str):
        self.name = name
        self.dtype_name = dtype_name


class _TorchDType(_Inert):
    """A torch dtype (`torch.float32`, ...), known by its numpy equivalent."""
    __slots__ = ('name', 'dtype_name')

    def __init__(self, name: str, dtype_name: str):
        self.name = name
        self.dtype_name = dtype_name


class _TensorType(_Inert):
    """`torch.Tensor` / `torch.nn.Parameter`, as named by `_rebuild_from_type_v2`."""
    __slots__ = ('name',)

    def __init__(self, name: str):
        self.name = name


class _NumpyDType:
    """`numpy.dtype(...)` as numpy pickles it for a scalar: a plain numeric dtype only."""

    def __init__(self, name, align=False, copy=False):
        if not isinstance(name, str):
            raise EDMPickleError(f'numpy dtype {name!r} is not a dtype name')
        dtype = np.dtype(name)
        if dtype.kind not in 'biufc' or dtype.fields is not None or dtype.subdtype is not None:
            raise EDMPickleError(f'numpy dtype {name!r} is not a plain numeric dtype')
        self.dtype = dtype

    def __setstate__(self, state):
        # numpy's dtype state: (version, byteorder, subarray, names, fields, elsize, align, flags).
        if not isinstance(state, tuple) or len(state) < 2 or state[1] not in '<>=|':
            raise EDMPickleError(f'unexpected numpy dtype state {state!r}')
        if state[1] in '<>':
            self.dtype = self.dtype.newbyteorder(state[1])


class _Persistent(_Inert):
    """An object of an EDM persistent class: its class name and `__dict__` state, no code."""
    __slots__ = ('class_name', 'state')

    def __init__(self, class_name: str, state: dict):
        self.class_name = class_name
        self.state = state

    def __repr__(self):
        return f'<persistent {self.class_name}>'


class _TorchModule:
    """A plain torch container module (`torch.nn.ModuleDict`, ...): its `__dict__` state only."""
    class_name = 'Module'

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise EDMPickleError(f'unexpected state for {self.class_name}: {type(state).__name__}')
        self.state = state


def _torch_module_class(name: str) -> type:
    return type(name, (_TorchModule,), {'class_name': name})


class _EasyDict(dict):
    """`dnnlib.util.EasyDict`: a dict (its attribute access is not needed here)."""

    def __setstate__(self, state):
        # A dict subclass pickles its (normally empty) instance __dict__ as state; it is dropped.
        if state is not None and not isinstance(state, dict):
            raise EDMPickleError('unexpected state for dnnlib.util.EasyDict')


def _reconstruct_persistent_obj(meta):
    """Stand-in for `torch_utils.persistence._reconstruct_persistent_obj`.

    The real function execs `meta['module_src']`; here it is never looked at.
    """
    if not isinstance(meta, dict) or meta.get('type') != 'class':
        raise EDMPickleError('persistent object with unexpected metadata')
    class_name, state = meta.get('class_name'), meta.get('state')
    if not isinstance(class_name, str) or not isinstance(state, (dict, type(None))):
        raise EDMPickleError('persistent object without a class name or state dict')
    return _Persistent(class_name, dict(state or {}))


def _check_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise EDMPickleError(f'tensor {what} {value!r} is not a non-negative integer')
    return int(value)


def _strided_copy(flat: np.ndarray, offset, size, stride) -> np.ndarray:
    """The tensor `flat[offset + sum(i_k * stride_k)]` of shape `size`, as a new C array."""
    offset = _check_int(offset, 'storage offset')
    if not isinstance(size, (tuple, list)) or not isinstance(stride, (tuple, list)) \
            or len(size) != len(stride):
        raise EDMPickleError(f'tensor size {size!r} and stride {stride!r} do not match')
    size = tuple(_check_int(n, 'size') for n in size)
    stride = tuple(_check_int(s, 'stride') for s in stride)
    if 0 in size:
        return np.empty(size, flat.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= flat.size:
        raise EDMPickleError(f'tensor view (offset {offset}, size {size}, stride {stride}) '
                             f'reads past the end of its storage of {flat.size} elements')
    view = np.lib.stride_tricks.as_strided(
        flat[offset:], shape=size, strides=tuple(s * flat.itemsize for s in stride),
        writeable=False)
    return np.array(view, order='C')  # A copy: no view into the pickle's bytes survives.


def _rebuild_tensor(storage, offset, size, stride):
    """Stand-in for torch's `_rebuild_tensor` / `_rebuild_tensor_v2`: a numpy array."""
    if not isinstance(storage, _Storage):
        raise EDMPickleError(f'tensor built from {type(storage).__name__}, not a storage')
    return _strided_copy(storage.array, offset, size, stride)


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None,
                       metadata=None):
    # requires_grad, backward hooks (always empty) and metadata do not affect the values.
    return _rebuild_tensor(storage, offset, size, stride)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype,
                       metadata=None):
    """torch's rebuild for dtypes without a typed storage: an untyped (byte) storage + dtype."""
    if not isinstance(storage, _Storage) or not isinstance(dtype, _TorchDType):
        raise EDMPickleError('malformed _rebuild_tensor_v3 arguments')
    raw = storage.array.view(np.uint8)
    item = _numpy_dtype(dtype.dtype_name)
    if raw.size % item.itemsize:
        raise EDMPickleError(f'storage of {raw.size} bytes is not a whole number of {dtype.name}')
    return _strided_copy(raw.view(item), offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
    """Stand-in for `_rebuild_parameter[_with_state]`: a parameter is just its data here."""
    if not isinstance(data, np.ndarray):
        raise EDMPickleError('parameter built from something other than a tensor')
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    """Stand-in for `torch._tensor._rebuild_from_type_v2` (a tensor with Python attributes)."""
    if not isinstance(func, _Global) or func.fn not in _TENSOR_BUILDERS \
            or not isinstance(new_type, _TensorType) or not isinstance(args, tuple):
        raise EDMPickleError('malformed _rebuild_from_type_v2 arguments')
    return func(*args)  # The Python attributes in `state` are not needed.


def _reconstructor(cls, base, state):
    """Stand-in for `copyreg._reconstructor` (protocol 0/1 pickles), for stand-in classes only."""
    if cls is _EasyDict and base is dict:
        return _EasyDict(state or {})
    if isinstance(cls, type) and issubclass(cls, _TorchModule) and base is object \
            and state is None:
        return cls()
    raise EDMPickleError(f'copyreg._reconstructor of {cls!r} is not allowed')


def _numpy_scalar(dtype, data):
    """Stand-in for numpy's scalar reconstructor: a numpy scalar of a plain numeric dtype."""
    if isinstance(data, str):  # Protocol 0-2 pickles of numpy 1 store the bytes as latin-1 text.
        data = data.encode('latin-1')
    if not isinstance(dtype, _NumpyDType) or not isinstance(data, bytes) \
            or len(data) != dtype.dtype.itemsize:
        raise EDMPickleError('malformed numpy scalar')
    return np.frombuffer(data, dtype.dtype).astype(dtype.dtype.newbyteorder('='))[0]


def _codecs_encode(text, encoding='utf-8'):
    """Stand-in for `_codecs.encode`, which protocol-2 pickles use for bytes objects."""
    if not isinstance(text, str) or encoding not in ('latin1', 'latin-1'):
        raise EDMPickleError('unexpected _codecs.encode call')
    return text.encode('latin-1')


def _torch_device(kind, index=None):
    """Stand-in for `torch.device`: its string form."""
    if not isinstance(kind, str):
        raise EDMPickleError('malformed torch.device')
    return kind if index is None else f'{kind}:{index}'


def _load_from_bytes(blob):
    """Stand-in for `torch.storage._load_from_bytes`: parse a `torch.save`d storage."""
    if isinstance(blob, bytearray):
        blob = bytes(blob)
    if not isinstance(blob, bytes):
        raise EDMPickleError('_load_from_bytes called without bytes')
    return _load_storage_blob(blob)


_TENSOR_BUILDERS = (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter)

# torch storage / dtype names -> numpy dtype names ('bfloat16' comes from ml_dtypes).
_STORAGE_DTYPES = {
    'FloatStorage': 'float32', 'DoubleStorage': 'float64', 'HalfStorage': 'float16',
    'BFloat16Storage': 'bfloat16', 'LongStorage': 'int64', 'IntStorage': 'int32',
    'ShortStorage': 'int16', 'CharStorage': 'int8', 'ByteStorage': 'uint8',
    'BoolStorage': 'bool', 'ComplexFloatStorage': 'complex64',
    'ComplexDoubleStorage': 'complex128', 'UntypedStorage': 'uint8',
}
_TORCH_DTYPES = {
    'float32': 'float32', 'float': 'float32', 'float64': 'float64', 'double': 'float64',
    'float16': 'float16', 'half': 'float16', 'bfloat16': 'bfloat16', 'int64': 'int64',
    'long': 'int64', 'int32': 'int32', 'int': 'int32', 'int16': 'int16', 'short': 'int16',
    'int8': 'int8', 'uint8': 'uint8', 'bool': 'bool', 'complex64': 'complex64',
    'cfloat': 'complex64', 'complex128': 'complex128', 'cdouble': 'complex128',
    'uint16': 'uint16', 'uint32': 'uint32', 'uint64': 'uint64',
}


def _numpy_dtype(name: str) -> np.dtype:
    if name == 'bfloat16':
        try:
            import ml_dtypes  # Installed with jax; numpy itself has no bfloat16.
        except ImportError as exc:  # pragma: no cover - jax always brings it.
            raise EDMPickleError('bfloat16 tensors need the ml_dtypes package') from exc
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _storage_globals() -> dict:
    """The storage classes a `torch.save` blob may name, under every module torch used."""
    table = {}
    for name, dtype_name in _STORAGE_DTYPES.items():
        stand_in = _StorageType(name, dtype_name)
        for module in ('torch', 'torch.cuda', 'torch.storage'):
            table[module, name] = stand_in
    return table


def _outer_globals() -> dict:
    """Whitelist of the network pickle: (module, name) -> stand-in. Nothing else resolves."""
    functions = {
        ('torch_utils.persistence', '_reconstruct_persistent_obj'): _reconstruct_persistent_obj,
        ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
        ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor_v2,
        ('torch._utils', '_rebuild_tensor_v3'): _rebuild_tensor_v3,
        ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
        ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
        ('torch._tensor', '_rebuild_from_type_v2'): _rebuild_from_type_v2,
        ('torch.storage', '_load_from_bytes'): _load_from_bytes,
        ('torch', 'device'): _torch_device,
        ('copyreg', '_reconstructor'): _reconstructor,
        ('numpy.core.multiarray', 'scalar'): _numpy_scalar,
        ('numpy._core.multiarray', 'scalar'): _numpy_scalar,
        ('_codecs', 'encode'): _codecs_encode,
    }
    table: dict[tuple[str, str], Any] = {
        key: _Global('.'.join(key), fn) for key, fn in functions.items()}
    table.update({
        # Builtin containers (immutable C types: BUILD cannot patch them) and stand-in classes.
        ('collections', 'OrderedDict'): collections.OrderedDict,
        ('builtins', 'set'): set, ('builtins', 'frozenset'): frozenset,
        ('builtins', 'object'): object, ('builtins', 'dict'): dict,
        ('numpy', 'dtype'): _NumpyDType,
        ('dnnlib.util', 'EasyDict'): _EasyDict, ('dnnlib', 'EasyDict'): _EasyDict,
        ('torch', 'Tensor'): _TensorType('Tensor'),
        ('torch._tensor', 'Tensor'): _TensorType('Tensor'),
        ('torch.nn.parameter', 'Parameter'): _TensorType('Parameter'),
    })
    for name in ('ModuleDict', 'ModuleList', 'Sequential'):
        table['torch.nn.modules.container', name] = _torch_module_class(name)
    for name, dtype_name in _TORCH_DTYPES.items():
        table['torch', name] = _TorchDType(name, dtype_name)
    table.update(_storage_globals())
    return table


# Python 2 era names that the C unpickler would normally translate itself.
_PY2_MODULES = {'__builtin__': 'builtins', 'copy_reg': 'copyreg'}

NOT_EDM = 'the file is not a plain NVlabs/edm network pickle'
NOT_STATE_DICT = 'the file is not a plain torch state dict'


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals of `allowed`, and nothing by import.

    `what` says what the file should have been, for the error messages.
    """

    def __init__(self, file, allowed: dict, persistent_load=None, what: str = NOT_EDM):
        super().__init__(file)
        self._allowed = allowed
        self._persistent_load = persistent_load
        self._what = what

    def find_class(self, module, name):
        module = _PY2_MODULES.get(module, module)
        try:
            return self._allowed[module, name]
        except (KeyError, TypeError):
            pass
        raise EDMPickleError(
            f'refusing to load global {module}.{name}: {self._what} (only the torch/EDM names '
            f'such pickles use are allowed, and the code embedded in them is never run)')

    def persistent_load(self, pid):
        # An instance attribute would not override the C unpickler's lookup, hence this hop.
        if self._persistent_load is None:
            raise EDMPickleError(f'unexpected persistent id {pid!r}: {self._what}')
        return self._persistent_load(pid)


_OUTER_GLOBALS = _outer_globals()
_BLOB_GLOBALS = _storage_globals()
# A state dict is an OrderedDict of tensors: the torch names of the network whitelist, without
# EDM's persistence, dnnlib and torch module classes.
_STATE_DICT_GLOBALS = {key: value for key, value in _OUTER_GLOBALS.items()
                       if not key[0].startswith(('torch_utils', 'dnnlib', 'torch.nn.modules'))}


# ---------------------------------------------------------------------------------------------
# torch.save blobs of single storages.
# ---------------------------------------------------------------------------------------------

_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_LEGACY_PROTOCOL = 1001


def _storage_pid(pid) -> tuple[str, np.dtype, int]:
    """(key, dtype, numel) of a torch.save persistent id.

    The id is ('storage', storage type, key, location, numel[, view metadata]).
    """
    if not isinstance(pid, tuple) or len(pid) not in (5, 6) or pid[0] != 'storage':
        raise EDMPickleError(f'unexpected persistent id {pid!r} in a torch storage blob')
    storage_type, key, _location, numel = pid[1:5]
    if len(pid) == 6 and pid[5] is not None:
        raise EDMPickleError('storage views of torch < 0.4 are not supported')
    if not isinstance(storage_type, _StorageType) or not isinstance(key, str):
        raise EDMPickleError(f'unexpected persistent id {pid!r} in a torch storage blob')
    return key, _numpy_dtype(storage_type.dtype_name), _check_int(numel, 'storage size')


def _with_order(dtype: np.dtype, order: str) -> np.dtype:
    return dtype.newbyteorder(order) if dtype.itemsize > 1 else dtype


def _native(array: np.ndarray) -> np.ndarray:
    """`array` in native byte order; a view of the blob when it already is (tensors copy it)."""
    return array if array.dtype.isnative else array.astype(array.dtype.newbyteorder('='))


def _load_storage_blob(blob: bytes) -> _Storage:
    """The storage in the bytes of `torch.save(storage)`, zip or legacy format."""
    if blob[:4] == b'PK\x03\x04':
        storage = _read_zip(io.BytesIO(blob), _BLOB_GLOBALS, NOT_EDM, 'torch zip blob')
    elif blob[257:262] == b'ustar':
        raise EDMPickleError('storage saved in the tar format of torch < 0.4 is not supported')
    else:
        storage = _read_legacy(blob, _BLOB_GLOBALS, NOT_EDM, 'legacy torch.save blob')
    if not isinstance(storage, _Storage):
        raise EDMPickleError('torch.save blob does not hold a storage')
    return storage


def _inert(table: dict) -> dict:
    """`table` with the tensor builders replaced by functions returning None."""
    builders = _TENSOR_BUILDERS + (_rebuild_from_type_v2,)
    return {key: _Global(value.qualname, lambda *args: None)
            if isinstance(value, _Global) and value.fn in builders else value
            for key, value in table.items()}


def _read_legacy(blob: bytes, table: dict, what: str, name: str):
    """The object of a legacy `torch.save` stream, its tensors filled from the raw storages.

    Layout: magic, protocol and sys_info pickles; the object pickle, whose storages are
    persistent ids; the pickled list of storage keys; then each storage in that order as an
    int64 element count and the elements, both little-endian. The element size of a record is
    known only from the persistent ids, so the object pickle is read twice: first with inert
    tensor builders to collect each storage's dtype and size, then for real.
    """
    f = io.BytesIO(blob)
    header = [_RestrictedUnpickler(f, {}, what=what).load() for _ in range(3)]
    if header[0] != _LEGACY_MAGIC or header[1] != _LEGACY_PROTOCOL:
        raise EDMPickleError(f'{name} is neither a torch zip file nor a legacy torch.save stream')
    start, wanted = f.tell(), {}

    def record(pid):
        key, dtype, numel = _storage_pid(pid)
        if wanted.setdefault(key, (dtype, numel)) != (dtype, numel):
            raise EDMPickleError(f'{name} names storage {key} with two types or sizes')

    _RestrictedUnpickler(f, _inert(table), record, what).load()
    keys = _RestrictedUnpickler(f, {}, what=what).load()
    if not isinstance(keys, list) or len(keys) != len(wanted) or set(keys) != set(wanted):
        raise EDMPickleError(f'{name} lists other storages than its object uses')
    pos, arrays = f.tell(), {}
    for key in keys:
        dtype, numel = wanted[key]
        count = int.from_bytes(blob[pos:pos + 8], 'little', signed=True)
        end = pos + 8 + count * dtype.itemsize
        if count != numel or end > len(blob):
            raise EDMPickleError(f'{name} is truncated or inconsistent')
        arrays[key] = _native(np.frombuffer(blob, _with_order(dtype, '<'), count, pos + 8))
        pos = end
    f.seek(start)
    return _RestrictedUnpickler(f, table, lambda pid: _Storage(arrays[_storage_pid(pid)[0]]),
                                what).load()


def _read_zip(source, table: dict, what: str, name: str):
    """The object of a zip `torch.save`: `<dir>/data.pkl` naming storages kept in
    `<dir>/data/<key>`, with `<dir>/byteorder` giving their byte order (little if absent)."""
    with zipfile.ZipFile(source) as zf:
        names = [n for n in zf.namelist() if n.endswith('data.pkl') and n.count('/') <= 1]
        if len(names) != 1:
            raise EDMPickleError(f'{name} without exactly one data.pkl')
        prefix = names[0][:-len('data.pkl')]

        def read(entry: str) -> bytes:
            info = zf.getinfo(prefix + entry)
            if info.compress_type != zipfile.ZIP_STORED:  # torch never compresses; avoid bombs.
                raise EDMPickleError(f'compressed entry {info.filename} in a {name}')
            return zf.read(info)

        order = '<'
        if prefix + 'byteorder' in zf.namelist():
            order = {b'little': '<', b'big': '>'}.get(read('byteorder').strip())
            if order is None:
                raise EDMPickleError(f'{name} with an unknown byte order')
        loaded = {}

        def persistent_load(pid):
            key, dtype, numel = _storage_pid(pid)
            if key not in loaded:  # Tensors sharing a storage share one array, as in torch.
                raw = read(f'data/{key}')
                if len(raw) != numel * dtype.itemsize:
                    raise EDMPickleError(f'storage {key} has {len(raw)} bytes, not {numel} '
                                         f'elements')
                loaded[key] = _Storage(_native(np.frombuffer(raw, _with_order(dtype, order))))
            return loaded[key]

        return _RestrictedUnpickler(io.BytesIO(read('data.pkl')), table, persistent_load,
                                    what).load()


# ---------------------------------------------------------------------------------------------
# From the unpickled objects to EDMPickle.
# ---------------------------------------------------------------------------------------------

def _plain(value):
    """Kwargs values as plain Python: dict subclasses become dicts, containers are copied."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return value


def _module_state(module, where: str) -> dict:
    if not isinstance(module, (_Persistent, _TorchModule)) or not isinstance(
            getattr(module, 'state', None), dict):
        raise EDMPickleError(f'{where} is {type(module).__name__}, not a torch module')
    return module.state


def _collect_state_dict(module, prefix: str, out: dict) -> None:
    """`module.state_dict()` as torch orders it: parameters, persistent buffers, then children."""
    where = prefix[:-1] or 'the network'
    state = _module_state(module, where)
    skip = state.get('_non_persistent_buffers_set') or set()
    for group in ('_parameters', '_buffers'):
        for name, value in (state.get(group) or {}).items():
            if value is None or (group == '_buffers' and name in skip):
                continue
            if not isinstance(value, np.ndarray):
                raise EDMPickleError(f'{prefix}{name} is {type(value).__name__}, not a tensor')
            out[prefix + name] = value
    for name, child in (state.get('_modules') or {}).items():
        if child is not None:
            _collect_state_dict(child, f'{prefix}{name}.', out)


def _recorded_kwargs(obj: _Persistent, names: tuple) -> dict | None:
    """Constructor arguments recorded by EDM's persistence; positional ones named by `names`."""
    args, kwargs = obj.state.get('_init_args'), obj.state.get('_init_kwargs')
    if args is None and kwargs is None:
        return None  # The object was created with `_record_init_args = False`.
    if not isinstance(args, (tuple, list, type(None))) \
            or not isinstance(kwargs, (dict, type(None))):
        raise EDMPickleError(f'{obj.class_name} recorded malformed constructor arguments')
    args, kwargs = tuple(args or ()), dict(kwargs or {})
    if len(args) > len(names):
        raise EDMPickleError(f'{obj.class_name} recorded {len(args)} positional arguments')
    return _plain({**dict(zip(names, args)), **kwargs})


def _precond_kwargs(net: _Persistent) -> dict:
    """The preconditioner's own constructor arguments (recorded, else its attributes)."""
    names = PRECOND_PARAMS[net.class_name]
    recorded = _recorded_kwargs(net, names + ('model_type',)) or {}
    out = {}
    for name in names:
        if name in recorded:
            out[name] = recorded[name]
        elif name in net.state:  # Left at its default: every EDM Precond stores these as is.
            out[name] = _plain(net.state[name])
    return out


def _model_kwargs(net: _Persistent, model: _Persistent, model_type: str) -> dict:
    """The inner network's constructor arguments as recorded by EDM's persistence."""
    recorded = _recorded_kwargs(model, MODEL_PARAMS[model_type])
    if recorded is not None:
        return recorded
    # Fallback: rebuild them from the Precond's record the way the Precond forwards them.
    outer = _recorded_kwargs(net, PRECOND_PARAMS[net.class_name] + ('model_type',))
    if outer is None:
        raise EDMPickleError('the pickle does not record the network constructor arguments')
    extra = {k: v for k, v in outer.items()
             if k not in PRECOND_PARAMS[net.class_name] and k != 'model_type'}
    channels = net.state['img_channels']
    return {'img_resolution': net.state['img_resolution'], 'in_channels': channels,
            'out_channels': channels * (2 if net.class_name == 'iDDPMPrecond' else 1),
            'label_dim': net.state['label_dim'], **extra}


def _to_edm_pickle(net) -> EDMPickle:
    if not isinstance(net, _Persistent) or net.class_name not in PRECOND_PARAMS:
        found = getattr(net, 'class_name', type(net).__name__)
        raise EDMPickleError(f'the network is {found}, not one of {", ".join(PRECOND_PARAMS)}')
    model = (net.state.get('_modules') or {}).get('model')
    if not isinstance(model, _Persistent) or model.class_name not in MODEL_PARAMS:
        found = getattr(model, 'class_name', type(model).__name__)
        raise EDMPickleError(f'{net.class_name}.model is {found}, not one of '
                             f'{", ".join(MODEL_PARAMS)}')
    state_dict: dict = {}
    _collect_state_dict(net, '', state_dict)
    return EDMPickle(precond=net.class_name, precond_kwargs=_precond_kwargs(net),
                     model_type=model.class_name,
                     model_kwargs=_model_kwargs(net, model, model.class_name),
                     state_dict=state_dict)


def _unpickle(f: BinaryIO):
    return _RestrictedUnpickler(f, _OUTER_GLOBALS).load()


def load_edm_pickle(path_or_file: str | os.PathLike | BinaryIO,
                    key: str | None = 'ema') -> EDMPickle:
    """Read the network stored under `key` of an NVlabs/edm pickle, safely and without torch.

    `path_or_file` is a path or a binary file object. `key` selects the entry of the pickled
    dict (EDM's snapshots hold 'ema'); with `key=None` the pickle must be the network itself.
    Raises `EDMPickleError` (a `pickle.UnpicklingError` and a `ValueError`) naming the file when
    the file is corrupt or truncated, names a global outside the whitelist, or does not hold an
    EDM preconditioner wrapping a SongUNet or DhariwalUNet.
    """
    if isinstance(path_or_file, (str, os.PathLike)):
        name = os.fspath(path_or_file)
        with open(name, 'rb') as f:
            return _load(f, name, key)
    return _load(path_or_file, getattr(path_or_file, 'name', '<file object>'), key)


def _load(f: BinaryIO, name: str, key: str | None) -> EDMPickle:
    try:
        data = _unpickle(f)
        if key is not None:
            if not isinstance(data, dict):
                raise EDMPickleError(f'the pickle holds {type(data).__name__}, not a dict with '
                                     f'{key!r}')
            if key not in data:
                raise EDMPickleError(f'no {key!r} in the pickle (it has {sorted(map(str, data))})')
            data = data[key]
        return _to_edm_pickle(data)
    except EDMPickleError as exc:
        raise EDMPickleError(f'{name}: {exc}') from exc
    except (EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, TypeError,
            KeyError, IndexError, AttributeError, OverflowError, RecursionError) as exc:
        # Truncated or corrupt data surfaces as any of these from pickle, zipfile or numpy.
        raise EDMPickleError(f'{name}: cannot read it as an EDM network pickle '
                             f'(corrupt or truncated?): {type(exc).__name__}: {exc}') from exc


# ---------------------------------------------------------------------------------------------
# Plain state dicts.
# ---------------------------------------------------------------------------------------------

def load_torch_state_dict(path_or_file: str | os.PathLike | BinaryIO) -> dict:
    """The state dict in a `torch.save(module.state_dict())` file, as numpy arrays, without torch.

    Reads torch's zip format (torch >= 1.6) and its legacy format (what older releases wrote,
    e.g. many published `.pth` files), with the restricted unpickler used for EDM pickles: only
    OrderedDict, torch's tensor and storage names and a few builtins resolve. Returns a dict
    from parameter name to a new C-contiguous array, in the file's order (torch's own
    `_metadata` attribute of the OrderedDict is dropped). Raises `EDMPickleError` (a
    `ValueError`) naming the file when it is corrupt, truncated, names another global or holds
    anything but a flat mapping from names to tensors.
    """
    if isinstance(path_or_file, (str, os.PathLike)):
        name = os.fspath(path_or_file)
        with open(name, 'rb') as f:
            blob = f.read()
    else:
        name, blob = getattr(path_or_file, 'name', '<file object>'), path_or_file.read()
    try:
        if blob[:4] == b'PK\x03\x04':
            root = _read_zip(io.BytesIO(blob), _STATE_DICT_GLOBALS, NOT_STATE_DICT, 'torch zip file')
        elif blob[257:262] == b'ustar':
            raise EDMPickleError('the tar format of torch < 0.4 is not supported')
        else:
            root = _read_legacy(blob, _STATE_DICT_GLOBALS, NOT_STATE_DICT, 'torch.save file')
        if not isinstance(root, dict):
            raise EDMPickleError(f'the file holds {type(root).__name__}, not a state dict')
        for key, value in root.items():
            if not isinstance(key, str) or not isinstance(value, np.ndarray):
                raise EDMPickleError(f'entry {key!r} is {type(value).__name__}, not a named '
                                     f'tensor: {NOT_STATE_DICT}')
        return dict(root)
    except EDMPickleError as exc:
        raise EDMPickleError(f'{name}: {exc}') from exc
    except (EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, TypeError,
            KeyError, IndexError, AttributeError, OverflowError, RecursionError) as exc:
        raise EDMPickleError(f'{name}: cannot read it as a torch state dict (corrupt or '
                             f'truncated?): {type(exc).__name__}: {exc}') from exc
