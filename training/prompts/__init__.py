"""Building blocks of prompt methods: what several methods share, and nothing registered.

A method module (``training.methods.*``) composes these and the protocol
(``training.protocol``); it never imports another method module. The blocks:

- :mod:`training.prompts.text`: seams into open_clip's text tower (run it from token embeddings,
  end-of-text lookup, exact padding trim, frozen-CLIP text features).
- :mod:`training.prompts.context`: learned context tokens (CoOp's), their initialisation and their
  placement around the class name; :class:`~training.prompts.context.ContextPromptMethod`, the
  body of the CoOp family.
- :mod:`training.prompts.deep`: deep prompts inside both towers (VPT, IVLP, MaPLe, PromptSRC) and
  :class:`~training.prompts.deep.DeepPromptMethod`.
- :mod:`training.prompts.knowledge`: the knowledge-guided family's hand-crafted anchors and
  distances (KgCoOp, ProGrad's teacher, TCP).
- :mod:`training.prompts.templates`: the reference's per-dataset hand-written templates.
- :mod:`training.prompts.host`: plug-ins on host methods (:class:`~training.prompts.host.HostedMethod`, DPC).
- :mod:`training.prompts.adapters`: the adapter hook (:func:`~training.prompts.adapters.wrap_modules`),
  replacing or wrapping modules inside the towers by rule.
"""
