"""promptbake training: backbones, data, prompt methods, the training loop and evaluation."""
