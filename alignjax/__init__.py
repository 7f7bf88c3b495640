"""alignjax: pure-functional preference-alignment kernels, losses, optimizers, adapters (JAX)."""

__version__ = "0.1.0"

from alignjax import ops  # noqa: E402

__all__ = ["__version__", "ops"]
