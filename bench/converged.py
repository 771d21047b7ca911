"""Gone: the converged protocol is a ``bench/run.py`` study (``pretrain-rounds``). Kept only for
``bench/scaling_curve.py``, which imports ``run_inprocess`` from here."""

from bench.common import run_inprocess  # noqa: F401
