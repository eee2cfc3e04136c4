"""Zero-copy views of numpy arrays and torch tensors for the C calls.

Nothing here copies data: a tensor that is not C-contiguous, has the wrong
dtype or shape, or lives on the wrong device is refused with a clear
exception.  numpy and torch are both optional; torch is imported only if the
caller hands in a torch tensor (it is then already imported).
"""

from __future__ import annotations

import sys

from . import _lib
from .errors import ContiguityError, DeviceError, DTypeError, InvalidArgumentError, ShapeError

try:  # numpy is the binding's only hard dependency for arrays, but keep the import soft
    import numpy as np
except ImportError:  # pragma: no cover
    np = None

try:  # bfloat16 for numpy, if installed
    import ml_dtypes as _ml_dtypes
    _NP_BF16 = np.dtype(_ml_dtypes.bfloat16) if np is not None else None
except Exception:  # pragma: no cover - optional
    _ml_dtypes = None
    _NP_BF16 = None

DTYPE_NAMES = {_lib.DTYPE_F32: "float32", _lib.DTYPE_F16: "float16", _lib.DTYPE_BF16: "bfloat16"}


def _torch():
    """torch if it has been imported by someone (we never import it here)."""
    return sys.modules.get("torch")


def is_torch(x) -> bool:
    t = _torch()
    return t is not None and isinstance(x, t.Tensor)


def is_numpy(x) -> bool:
    return np is not None and isinstance(x, np.ndarray)


def numpy_bf16():
    """The numpy dtype for bfloat16 (ml_dtypes), or None if unavailable."""
    return _NP_BF16


def parse_dtype(d) -> int:
    """oscar_dtype from a name ("f32", "float16", "bf16" ...), numpy or torch dtype."""
    if isinstance(d, int) and d in DTYPE_NAMES:
        return d
    t = _torch()
    if t is not None and isinstance(d, t.dtype):
        m = {t.float32: _lib.DTYPE_F32, t.float16: _lib.DTYPE_F16, t.bfloat16: _lib.DTYPE_BF16}
        if d in m:
            return m[d]
        raise DTypeError("dtype %s is not supported (float32, float16, bfloat16)" % d)
    if isinstance(d, str):
        key = d.lower().replace("torch.", "")
        m = {"f32": _lib.DTYPE_F32, "float32": _lib.DTYPE_F32, "fp32": _lib.DTYPE_F32,
             "f16": _lib.DTYPE_F16, "float16": _lib.DTYPE_F16, "fp16": _lib.DTYPE_F16,
             "half": _lib.DTYPE_F16,
             "bf16": _lib.DTYPE_BF16, "bfloat16": _lib.DTYPE_BF16}
        if key in m:
            return m[key]
        raise DTypeError("unknown dtype name %r (f32, f16, bf16)" % d)
    if np is not None:
        try:
            nd = np.dtype(d)
        except TypeError:
            nd = None
        if nd is not None:
            if nd == np.float32:
                return _lib.DTYPE_F32
            if nd == np.float16:
                return _lib.DTYPE_F16
            if _NP_BF16 is not None and nd == _NP_BF16:
                return _lib.DTYPE_BF16
            raise DTypeError("dtype %s is not supported (float32, float16, bfloat16)" % nd)
    raise DTypeError("cannot interpret %r as a dtype" % (d,))


class View:
    """What the C call needs from one tensor."""

    __slots__ = ("obj", "ptr", "dtype", "shape", "device_type", "device_index", "kind")

    def __init__(self, obj, ptr, dtype, shape, device_type, device_index, kind):
        self.obj = obj              # keeps the tensor alive during the call
        self.ptr = ptr
        self.dtype = dtype          # oscar_dtype
        self.shape = shape
        self.device_type = device_type  # "cpu" or "cuda"
        self.device_index = device_index
        self.kind = kind            # "numpy" or "torch"


def view(x, name: str, *, shape=None, dtypes=None, writable=False) -> View:
    """Checks `x` and returns its pointer, without copying.

    shape: expected tuple (None entries are free); dtypes: allowed oscar dtypes.
    """
    if is_torch(x):
        t = _torch()
        m = {t.float32: _lib.DTYPE_F32, t.float16: _lib.DTYPE_F16, t.bfloat16: _lib.DTYPE_BF16}
        if x.dtype not in m:
            raise DTypeError("%s: dtype %s is not supported; use float32, float16 or bfloat16"
                             % (name, x.dtype))
        dt = m[x.dtype]
        if not x.is_contiguous():
            raise ContiguityError(
                "%s: tensor is not contiguous (shape %s, strides %s); call .contiguous() "
                "first: the binding never copies" % (name, tuple(x.shape), tuple(x.stride())))
        if writable and x.requires_grad and x.is_leaf:
            raise InvalidArgumentError("%s: output tensor requires grad" % name)
        dev = x.device
        v = View(x, x.data_ptr(), dt, tuple(x.shape), dev.type,
                 dev.index if dev.index is not None else 0, "torch")
        if dev.type not in ("cpu", "cuda"):
            raise DeviceError("%s: tensors on device %s are not supported (cpu or cuda)"
                              % (name, dev))
    elif is_numpy(x):
        nd = x.dtype
        if nd == np.float32:
            dt = _lib.DTYPE_F32
        elif nd == np.float16:
            dt = _lib.DTYPE_F16
        elif _NP_BF16 is not None and nd == _NP_BF16:
            dt = _lib.DTYPE_BF16
        else:
            raise DTypeError("%s: dtype %s is not supported; use float32, float16 or bfloat16 "
                             "(ml_dtypes.bfloat16)" % (name, nd))
        if not x.flags.c_contiguous:
            raise ContiguityError(
                "%s: array is not C-contiguous (shape %s, strides %s); use "
                "np.ascontiguousarray first: the binding never copies" % (name, x.shape, x.strides))
        if writable and not x.flags.writeable:
            raise InvalidArgumentError("%s: output array is read-only" % name)
        v = View(x, x.ctypes.data, dt, tuple(x.shape), "cpu", 0, "numpy")
    else:
        raise DTypeError("%s: expected a numpy array or a torch tensor, got %s"
                         % (name, type(x).__name__))
    if dtypes is not None and v.dtype not in dtypes:
        raise DTypeError("%s: dtype %s is not allowed here (allowed: %s)"
                         % (name, DTYPE_NAMES[v.dtype], ", ".join(DTYPE_NAMES[d] for d in dtypes)))
    if shape is not None:
        ok = len(shape) == len(v.shape) and all(
            e is None or e == g for e, g in zip(shape, v.shape))
        if not ok:
            want = "[" + ", ".join("*" if e is None else str(e) for e in shape) + "]"
            raise ShapeError("%s: shape %s does not match the expected %s"
                             % (name, list(v.shape), want))
    return v


def check_device(v: View, backend: int, device: int, name: str) -> None:
    if backend == _lib.BACKEND_CPU:
        if v.device_type != "cpu":
            raise DeviceError("%s is on %s:%d but the cache uses the CPU backend; "
                              "pass a CPU tensor (the binding never copies between devices)"
                              % (name, v.device_type, v.device_index))
    else:
        if v.device_type != "cuda":
            raise DeviceError("%s is a host (%s) %s but the cache uses the CUDA backend on "
                              "cuda:%d; pass a CUDA tensor" % (name, v.device_type,
                                                                "array" if v.kind == "numpy" else "tensor",
                                                                device))
        if v.device_index != device:
            raise DeviceError("%s is on cuda:%d but the cache lives on cuda:%d"
                              % (name, v.device_index, device))


def current_stream(v: View):
    """The current CUDA stream of the tensor's device, as a void* value."""
    if v.device_type != "cuda":
        return None
    t = _torch()
    s = t.cuda.current_stream(v.device_index).cuda_stream
    return s or None


def empty_like_output(like: View, shape, dtype: int):
    """A new output tensor of the same kind and device as `like`."""
    if like.kind == "torch":
        t = _torch()
        tdt = {_lib.DTYPE_F32: t.float32, _lib.DTYPE_F16: t.float16, _lib.DTYPE_BF16: t.bfloat16}[dtype]
        return t.empty(shape, dtype=tdt, device=like.obj.device)
    if dtype == _lib.DTYPE_BF16:
        if _NP_BF16 is None:
            raise DTypeError("bfloat16 numpy output needs the ml_dtypes package")
        ndt = _NP_BF16
    else:
        ndt = {_lib.DTYPE_F32: np.float32, _lib.DTYPE_F16: np.float16}[dtype]
    return np.empty(shape, dtype=ndt)


def int32_host(values, name: str):
    """A ctypes int32 array from a sequence / array / tensor of ints."""
    if is_torch(values):
        values = values.detach().cpu().tolist()
    elif is_numpy(values):
        values = values.tolist()
    elif isinstance(values, int):
        values = [values]
    try:
        vals = [int(x) for x in values]
    except (TypeError, ValueError):
        raise InvalidArgumentError("%s: expected a sequence of ints, got %r" % (name, values))
    for x in vals:
        if not (-2**31 <= x < 2**31):
            raise InvalidArgumentError("%s: value %d does not fit in int32" % (name, x))
    arr = (_lib.c_int32 * max(1, len(vals)))(*vals)
    return arr, vals
