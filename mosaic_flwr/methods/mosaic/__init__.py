"""Mosaic (data-free knowledge distillation via mixture of experts), as small PyTorch
functions and its strategy:

- ``strategy``: the server side (class experts, meta model, distillation schedule).
- ``client``: what a client computes at the distillation round (prototypes, its generator).
- ``prototypes``: k-means and per-class feature prototypes, and the prototype screen.
- ``meta``: the meta model that fuses expert logits, and its training on prototypes.
- ``generator``, ``dcgan``: the clients' class-conditional generator and the authors'
  unconditional DCGAN.

Modules are imported by full path, e.g. ``from mosaic_flwr.methods.mosaic.meta import ...``."""
