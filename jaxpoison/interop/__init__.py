"""Bridges to other frameworks. `jaxpoison.interop.pytorch`: trained models as PyTorch modules
(it imports torch, an optional dependency; nothing here imports it otherwise)."""
