"""The ``promptbake bench`` tools: each measures one cost side by side in one run and prints the figures.

- :mod:`training.bench.train`: promptbake's training loop against a reference-style (Dassl) loop, and the
  image-feature cache, each in a fresh process, with the accuracy each reaches.
- :mod:`training.bench.classify`: what one classification costs with each artifact (in process).
- :mod:`training.bench.serve`: the served HTTP path against in-process runs, with the fraction of peak.
- :mod:`training.bench.train_cost`: epoch time and peak memory of several methods' training, each in
  a fresh process (SkipT against CoOp).
- :mod:`training.bench.export`: the exporters on a real architecture (``python -m training.bench.export``).
"""
