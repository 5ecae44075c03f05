"""Doctest settings for the package's own docstring examples."""

import jax

jax.config.update("jax_default_matmul_precision", "highest")
