"""Privacy of what clients upload: differential privacy (``dp``) and its audit (``audit``)."""
