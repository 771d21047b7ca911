"""Privacy of what clients upload: differential privacy (``dp.py``) and its audit (``audit.py``)."""
