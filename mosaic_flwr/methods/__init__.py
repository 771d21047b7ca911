"""One file per method: its strategy (a ``FedAvgStrategy`` or ``DistillStrategy``), its
``Method`` (settings, checks, clients' side) and nothing shared. Mosaic is a subpackage with
its client generators, prototypes and meta model. The registry (``mosaic_flwr.registry``)
names them; this package imports none of them."""
