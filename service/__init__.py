"""promptbake's BentoML service (``service.service:PromptbakeService``).

Torch-free by design: it depends on onnxruntime, numpy, pillow, pydantic, bentoml and the
torch-free part of ``exports`` only. Importing this package loads no model.
"""
