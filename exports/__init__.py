"""Export side of promptbake: ONNX artifacts and the torch-free pieces the service reads.

The torch-free modules here (tokenizer, preprocessing) must never import torch or open_clip;
the service imports them without either installed.
"""
