"""The server-side data-free distillation core shared by Mosaic, FedDF, DENSE, FedFTG and DFRD:
the distillation round and the clients' gate (``server``), the KD loss and loop (``kd``),
teachers built from the clients' models (``teachers``: plain and label-aware ensembles, class
experts fused by a meta model), class experts and their batched evaluation (``experts``),
samplers over the clients' uploaded generators (``samplers``) and the server-trained
generators of DENSE, FedFTG and DFRD (``generators``).

It imports ``core`` and nothing from ``methods``."""
