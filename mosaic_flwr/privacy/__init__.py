"""Privacy of what clients upload: the audit (``audit.py``)."""
