"""promptbake training: backbones, data, prompt methods, the training loop and evaluation."""
from training import benchmark as _benchmark  # noqa: F401  (registers the emoji benchmark datasets by name)
