"""jaxpoison: availability poisons, defenses and their measurement, compiled with JAX."""

__version__ = "0.1.0"
