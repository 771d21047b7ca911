"""mosaic-flwr: Mosaic (data-free KD via mixture of experts) and baselines as a Flower app."""

__version__ = "0.1.0"
