"""Architecture design under a device's latency table: ``deploycomp design``.

Two ways to get a small ViT without pruning a trained one:

- ``solve.design_arch``: a DeepMAD-style mathematical programme (maximise an analytic entropy of
  the network subject to the latency table's prediction, optional parameter/FLOP caps and an
  effectiveness bound on depth vs width), solved by scipy's MILP solver (HiGHS);
- ``scale.scale_uniform``: TinyViT-style uniform scaling of a given model under the same
  constraints, initialised from its weights by slicing.

Either result is a ``DesignedViT`` (``model.py``) registered with timm under its own name
(``registry.py``), so ``deploycomp train timm:<name>`` trains it. docs/design.md explains the
mapping from DeepMAD's CNN objective to a ViT.
"""
