"""NullBooth on Ray: null-space constrained DreamBooth LoRA for Stable Diffusion 1.x and LCM."""

from nullbooth.errors import NullBoothError

__version__ = "0.1.0"
__all__ = ["NullBoothError", "__version__"]
