"""The ``promptbake bench`` tools: each measures one cost side by side in one run and prints the figures.

- :mod:`training.bench.cache`: epoch time with and without the image-feature cache.
- :mod:`training.bench.classify`: what one classification costs with each artifact (in process).
- :mod:`training.bench.serve`: the served HTTP path against in-process runs, with the fraction of peak.
- :mod:`training.bench.train_cost`: epoch time and peak memory of several methods' training, each in
  a fresh process (SkipT against CoOp).
- :mod:`training.bench.export`: the exporters on a real architecture (``python -m training.bench.export``).
"""
