"""One round's client work, replayed into several server variants.

A study of the server side (which teacher, which meta-model data, which distillation budget)
compares variants that differ only after the clients' replies of one round. ``Fork.at`` plays a
federation up to that round once: round 0's evaluation, the rounds before it whole, then the
round's client work alone, keeping a copy of every reply. ``Fork.branch`` gives each variant a
strategy of its own method and settings standing exactly where the shared one stood (its
state, the metrics recorded so far, the random-number generators) and lets it collect and
apply its own copy of those replies; ``Fork.run`` also plays the variant's remaining rounds and
finishes it, as a run would. The variants are paired by construction: same models, same
uploads, one round of client work for all.

    fork = Fork.at(MosaicStrategy(sc), server_round=w)
    for sc_v in variants:                    # ServerContexts of the same federation (grid)
        fork.run(sc_v)                       # its distillation round, fine-tune rounds, finish

Nothing here reaches into a strategy: ``FedAvgStrategy`` has the hooks (``keep_models``,
``recorded``, ``play``), ``state_dict``/``load_state_dict`` carry its state.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from mosaic_flwr.core.checkpoint import rng_state, set_rng_state


@dataclass
class Fork:
    """A federation after one round's client work: the strategy's state before the round was
    applied, what it had recorded, the RNG states, and the round's replies."""

    server_round: int
    state: dict
    rounds: list
    extra: dict
    rng: dict
    train_metrics: dict
    replies: list = field(repr=False)
    items: list = field(repr=False)  # the round as the forking strategy collected it
    strategy: Any = field(repr=False)  # the forking strategy, the round collected, not applied

    @classmethod
    def at(cls, strategy, server_round: int, *, keep_models: bool = False) -> "Fork":
        """Play ``strategy`` (a new one) to round ``server_round``'s replies: round 0 evaluated,
        rounds before it played whole, then that round's client work. ``keep_models``: the
        round's client models are kept, not streamed into running sums (``items``: for a
        diagnostic that reads every client model)."""
        if server_round < 1:
            raise ValueError(f"Fork.at: server_round must be at least 1, got {server_round}")
        strategy.evaluate_round(0)
        strategy.play(1, server_round - 1)
        strategy.keep_models, strategy.recorded = keep_models, []
        try:
            items = strategy.train_round(server_round)
            replies = strategy.recorded
        finally:
            strategy.keep_models, strategy.recorded = False, None
        sc = strategy.sc
        return cls(server_round, copy.deepcopy(strategy.state_dict()), copy.deepcopy(sc.results.rounds),
                   copy.deepcopy(sc.results.extra), rng_state(), dict(sc.train_metrics), replies, items, strategy)

    def branch(self, sc, strategy_class=None):
        """A strategy of ``sc``'s method (``strategy_class``, else the registry's) standing where
        the fork stood, with the forked round collected from its own copy of the replies,
        applied and evaluated: what a run of ``sc``'s settings would be after that round."""
        if strategy_class is None:
            from mosaic_flwr.registry import STRATEGIES

            strategy_class = STRATEGIES[sc.cfg.strategy].strategy
        strategy = strategy_class(sc)
        strategy.load_state_dict(copy.deepcopy(self.state))
        sc.results.restore(copy.deepcopy(self.rounds), copy.deepcopy(self.extra))
        set_rng_state(copy.deepcopy(self.rng))
        items = strategy.collect(self.server_round, [copy.deepcopy(m) for m in self.replies])
        sc.train_metrics = dict(self.train_metrics)  # the round's client work, as the fork received it
        strategy.apply_round(self.server_round, items)
        strategy.evaluate_round(self.server_round)
        return strategy

    def run(self, sc, strategy_class=None):
        """``branch``, then the variant's remaining rounds and its ``finish``; the strategy."""
        strategy = self.branch(sc, strategy_class)
        strategy.play(self.server_round + 1, sc.cfg.num_server_rounds)
        strategy.finish()
        return strategy
