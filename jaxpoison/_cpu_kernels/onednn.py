"""oneDNN convolutions for XLA:CPU, called through `jax.ffi` (the way PyTorch gets its speed).

`jaxpoison.ops` uses them for fp32 convolutions on the CPU backend when the library is available;
everything else (other dtypes, GPU/TPU, no oneDNN) stays on XLA. The C++ source,
``csrc/onednn_conv.cc`` beside this module, is compiled at first use against the oneDNN wheels
that jaxpoison depends on (on Linux x86-64: ``onednn-cpu-gomp`` and ``onednn-devel-cpu-gomp``,
oneDNN 3.2 with GNU OpenMP) and jaxlib's FFI headers, with the system's C++ compiler, into
a cache directory (``$JAXPOISON_CACHE_DIR``, else ``~/.cache/jaxpoison``), once per source and
jaxlib version; concurrent processes wait on a file lock, and the library is written atomically.

``JAXPOISON_CONV=xla`` (environment) or ``ops.set_conv_backend("xla")`` turns the kernels off;
``onednn`` makes a missing library an error instead of a fallback. ``JAXPOISON_ONEDNN_ROOT``
points at another oneDNN installation (a prefix with ``include/`` and ``lib/``).
Measurements: docs/performance.md.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

_SOURCE = Path(__file__).resolve().parent / "csrc" / "onednn_conv.cc"
_TARGETS = {
    "forward": "JaxpoisonConvForward",
    "backward_data": "JaxpoisonConvBackwardData",
    "backward_weights": "JaxpoisonConvBackwardWeights",
}


class OneDNNUnavailable(RuntimeError):
    """The oneDNN kernels could not be found or built; the message says why and what to do."""


def _onednn_root():
    candidates = [
        os.environ.get("JAXPOISON_ONEDNN_ROOT"),
        sys.prefix,
        sysconfig.get_paths()["data"],
    ]
    for root in filter(None, candidates):
        root = Path(root)
        if (root / "include" / "oneapi" / "dnnl" / "dnnl.hpp").is_file() and any(
            (root / "lib").glob("libdnnl.so*")
        ):
            return root
    raise OneDNNUnavailable(
        "oneDNN headers and library not found (looked for include/oneapi/dnnl/dnnl.hpp and "
        f"lib/libdnnl.so under {[c for c in candidates if c]}). Install them with "
        "`pip install onednn-cpu-gomp onednn-devel-cpu-gomp` (jaxpoison's dependencies on Linux "
        "x86-64), or set JAXPOISON_ONEDNN_ROOT to a oneDNN prefix; "
        "JAXPOISON_CONV=xla silences this and keeps XLA's convolutions."
    )


def _cache_dir():
    base = os.environ.get("JAXPOISON_CACHE_DIR")
    if base:
        return Path(base)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "jaxpoison"


def _build(root):
    import jaxlib

    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise OneDNNUnavailable(
            "no C++ compiler (c++ / g++, or $CXX) to build the oneDNN kernels; install one "
            "(e.g. apt install g++) or set JAXPOISON_CONV=xla."
        )
    digest = hashlib.sha256(
        _SOURCE.read_bytes() + f"{jaxlib.__version__}|{root}|{compiler}".encode()
    ).hexdigest()[:16]
    cache = _cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"onednn_conv-{digest}.so"
    if target.is_file():
        return target
    with open(cache / f"onednn_conv-{digest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same library
        if target.is_file():
            return target
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        command = [
            compiler,
            "-O2",
            "-std=c++17",
            "-shared",
            "-fPIC",
            "-isystem",
            str(jax.ffi.include_dir()),
            "-isystem",
            str(root / "include"),
            str(_SOURCE),
            f"-L{root / 'lib'}",
            "-ldnnl",
            f"-Wl,-rpath,{root / 'lib'}",
            "-o",
            tmp,
        ]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            os.unlink(tmp)
            raise OneDNNUnavailable(
                f"building the oneDNN kernels failed ({' '.join(command)}):\n"
                f"{result.stderr[-2000:]}\nSet JAXPOISON_CONV=xla to use XLA's convolutions."
            )
        os.replace(tmp, target)
    return target


@functools.cache
def _load():
    library = ctypes.cdll.LoadLibrary(str(_build(_onednn_root())))
    for name, symbol in _TARGETS.items():
        jax.ffi.register_ffi_target(
            f"jaxpoison_conv_{name}", jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu"
        )
    return True


@functools.cache
def available():
    """True when the kernels are built and registered; warns once with the reason if not."""
    try:
        return _load()
    except OneDNNUnavailable as e:
        warnings.warn(f"jaxpoison: using XLA's convolutions on CPU: {e}", stacklevel=2)
        return False


def require():
    """Builds and registers the kernels, raising `OneDNNUnavailable` with the reason if it can't."""
    return _load()


def _attrs(strides, pads):
    (pt, pb), (pl, pr) = pads
    return dict(
        sh=np.int64(strides[0]),
        sw=np.int64(strides[1]),
        pt=np.int64(pt),
        pb=np.int64(pb),
        pl=np.int64(pl),
        pr=np.int64(pr),
    )


def _call(name, shape, *args, strides, pads):
    _load()
    out = jax.ShapeDtypeStruct(shape, jnp.float32)
    call = jax.ffi.ffi_call(f"jaxpoison_conv_{name}", out, vmap_method="expand_dims")
    return call(*args, **_attrs(strides, pads))


def _geometry(in_hw, kernel_hw, strides, pads):
    """oneDNN's padding for XLA's: per axis (low, high) pads and the input window they read.

    oneDNN wants ``n + low + high - k == (out - 1) * stride`` exactly, where XLA allows padding
    (or input) that no output reads: a 1x1 stride-2 kernel on 8 pixels reads pixels 0..6. The
    unread part is dropped: excess padding is trimmed, and unread input (a negative exact pad)
    is cropped. Returns ((low, high) per axis, (start, stop) of the input per axis, output size).
    """
    padding, window, out_hw = [], [], []
    for n, k, s, (lo, hi) in zip(in_hw, kernel_hw, strides, pads, strict=True):
        out = (n + lo + hi - k) // s + 1
        start = max(0, -lo)
        lo = max(0, lo)
        stop = min(n, (out - 1) * s + k - lo + start)
        padding.append((lo, (out - 1) * s + k - lo - (stop - start)))
        window.append((start, stop))
        out_hw.append(out)
    return tuple(padding), tuple(window), tuple(out_hw)


def _crop(x, window):
    (h0, h1), (w0, w1) = window
    if (h0, w0) == (0, 0) and (h1, w1) == x.shape[1:3]:
        return x
    return x[:, h0:h1, w0:w1]


def conv(x, w, strides, pads):
    """NHWC/HWIO fp32 convolution with explicit ((top, bottom), (left, right)) padding."""
    padding, window, (ho, wo) = _geometry(x.shape[1:3], w.shape[:2], strides, pads)
    shape = (x.shape[0], ho, wo, w.shape[3])
    return _call("forward", shape, _crop(x, window), w, strides=strides, pads=padding)


def input_gradient(ct, w, in_hw, strides, pads):
    """d<conv(x, w), ct>/dx for an input of spatial size ``in_hw``."""
    padding, window, _ = _geometry(in_hw, w.shape[:2], strides, pads)
    (h0, h1), (w0, w1) = window
    shape = (ct.shape[0], h1 - h0, w1 - w0, w.shape[2])
    dx = _call("backward_data", shape, ct, w, strides=strides, pads=padding)
    if shape[1:3] == tuple(in_hw):
        return dx
    return jnp.pad(dx, ((0, 0), (h0, in_hw[0] - h1), (w0, in_hw[1] - w1), (0, 0)))


def kernel_gradient(x, ct, kernel_hw, strides, pads):
    """d<conv(x, w), ct>/dw for a kernel of spatial size ``kernel_hw`` (HWIO)."""
    padding, window, _ = _geometry(x.shape[1:3], kernel_hw, strides, pads)
    shape = (*kernel_hw, x.shape[3], ct.shape[3])
    return _call("backward_weights", shape, _crop(x, window), ct, strides=strides, pads=padding)
