"""CPU-only convolution kernels: oneDNN called from XLA:CPU through `jax.ffi`.

`jaxpoison.ops` is the one module that uses them, through this surface only; nothing else
imports the subpackage. `onednn.py` builds ``csrc/onednn_conv.cc`` at first use and registers
its FFI handlers for the CPU platform; its docstring has the details.

``available()`` / ``require()`` build and register the kernels (warning once and returning False,
or raising `OneDNNUnavailable`, when they cannot be built); ``conv``, ``input_gradient`` and
``kernel_gradient`` are the three kernels of an NHWC/HWIO fp32 convolution. They carry no
derivatives of their own (`jaxpoison.ops` defines them) and lower for the CPU platform only.
"""

from jaxpoison._cpu_kernels.onednn import (
    OneDNNUnavailable,
    available,
    conv,
    input_gradient,
    kernel_gradient,
    require,
)

__all__ = [
    "OneDNNUnavailable",
    "available",
    "conv",
    "input_gradient",
    "kernel_gradient",
    "require",
]
