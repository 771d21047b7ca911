"""Mosaic as small, pure PyTorch functions (no Flower here).

Modules are imported by full path, e.g. ``from mosaic_flwr.mosaic.experts import
StackedExperts``:

- ``prototypes``: k-means and per-class feature prototypes (client side).
- ``experts``: class experts as label-count-weighted parameter averages, and a batched
  (``vmap``) evaluator for all experts at once.
- ``meta``: the meta model that fuses expert logits, and its training on prototypes.
- ``distill``: the KD loss (KL + CE on teacher argmax + true JSD) and the distillation loop.
- ``generator``, ``training``: client-side generator training and local training.
"""
