"""Optuna's TPE (accuracy) and NSGA-II (accuracy against cost) driven by ask/tell.

The depth-then-dims space becomes conditional parameters (``lora.depth``, then ``lora.dim0`` ..
for the active layers only). A proposal outside the budget is not evaluated: it is told to the
study as infeasible through Optuna's constraints (``constraint > 0``), so the sampler learns to
avoid that region; a proposal already evaluated is told its known result again without being
evaluated. Only legal, unseen proposals are returned, ``batch_size`` a round. With ``anchors``
the space's anchors (``nas.search.anchors``) are the study's first trials (enqueued); after
that, a ``moves`` share of each round is budget moves of the ``top_k`` best so far (enqueued
before the sampler's own proposals), so that the study reaches what its sampler alone would not.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import ClassVar

import optuna

from nas.search.anchors import move
from nas.search.base import Evaluated, SearchAlgorithm, pareto_front
from nas.search.operators import suggest
from nas.space.search_space import SearchSpace
from nas.space.subnet import Subnet

BUDGET = "budget"  # the constraint's name: > 0 means outside the budget


class OptunaSearch(SearchAlgorithm):
    """Base of the Optuna-backed searches; ``multi_objective`` picks NSGA-II."""

    multi_objective = False
    option_ranges: ClassVar[dict[str, tuple[float, float]]] = {"moves": (0.0, 1.0)}

    def __init__(
        self,
        space: SearchSpace,
        *,
        num_candidates: int = 500,
        batch_size: int = 25,
        seed: int = 0,
        cost: str = "params",
        max_attempts: int = 50,
        anchors: bool = True,
        moves: float = 0.5,
        top_k: int = 5,
        named_anchors: Sequence[Subnet] = (),
    ) -> None:
        super().__init__(space, seed=seed, cost=cost, named_anchors=named_anchors)
        self.moves, self.top_k = moves, top_k
        self.rng = random.Random(seed)
        self.planned = num_candidates
        self.batch_size = batch_size
        self.max_attempts = max_attempts
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.study = optuna.create_study(
            directions=["maximize", "minimize"] if self.multi_objective else ["maximize"],
            sampler=self._sampler(),
        )
        self._open: dict[Subnet, list[optuna.trial.Trial]] = {}
        self._known: dict[Subnet, Evaluated] = {}
        if anchors:  # the study's first trials (``nas.search.anchors``)
            for subnet in self.anchors()[:num_candidates]:
                self.study.enqueue_trial(self._params(subnet))

    def _params(self, subnet: Subnet) -> dict[str, object]:
        """A subnet as the study's parameters (the active ones)."""
        return {
            f"{kind}.{name}": value
            for kind, space in self.space.modules.items()
            for name, value in space.encode(subnet[kind]).items()
        }

    def _sampler(self) -> optuna.samplers.BaseSampler:
        raise NotImplementedError

    @property
    def finished(self) -> bool:
        return len(self.history) >= self.planned

    def _values(self, e: Evaluated) -> list[float]:
        return [e.score, e.cost] if self.multi_objective else [e.score]

    def _suggest(self, trial: optuna.trial.Trial) -> Subnet:
        return Subnet(
            {kind: suggest(space, trial, f"{kind}.") for kind, space in self.space.modules.items()}
        )

    def _propose(self) -> list[Subnet]:
        want = min(self.batch_size, self.planned - len(self.history))
        if self.history and self.moves:  # budget moves of the best so far, asked first
            parents = [e.subnet for e in self.best(self.top_k)]
            for _ in range(round(self.moves * want)):
                child = move(self.space, self.rng.choice(parents), self.rng)
                if child is not None:
                    self.study.enqueue_trial(self._params(child), skip_if_exists=True)
        out: list[Subnet] = []
        attempts = 0
        while len(out) < want and attempts < want * self.max_attempts:
            attempts += 1
            trial = self.study.ask()
            subnet = self._suggest(trial)
            legal = self.legal(subnet)
            trial.set_constraint(BUDGET, 0.0 if legal else self._excess(subnet))
            if subnet in self._known:  # evaluated before: its result, no new evaluation
                self.study.tell(trial, self._values(self._known[subnet]))
            elif not legal:
                worst = [0.0, self.cost(subnet)] if self.multi_objective else [0.0]
                self.study.tell(trial, worst)
            elif subnet in out:  # proposed twice in this round: answered with the first
                self._open.setdefault(subnet, []).append(trial)
            else:
                out.append(subnet)
                self._open.setdefault(subnet, []).append(trial)
        return out

    def _excess(self, subnet: Subnet) -> float:
        """How far outside the budget (relative), > 0 for infeasible proposals."""
        b = self.space.budget.params
        p = self.cost(subnet) if self.cost_metric == "params" else None
        if p is not None and b.high is not None and p > b.high:
            return (p - b.high) / max(b.high, 1.0)
        if p is not None and b.low is not None and p < b.low:
            return (b.low - p) / max(b.low, 1.0)
        return 1.0

    def _observe(self, results) -> None:
        for e in results:
            self._known[e.subnet] = e
            for trial in self._open.pop(e.subnet, []):
                self.study.tell(trial, self._values(e))

    def pareto_front(self) -> list[Evaluated]:
        """Evaluated candidates no other beats on both accuracy and cost, cheapest first."""
        return pareto_front(self.history)


class TPESearch(OptunaSearch):
    name = "optuna-tpe"

    def _sampler(self) -> optuna.samplers.BaseSampler:
        return optuna.samplers.TPESampler(seed=self.seed)


class NSGA2Search(OptunaSearch):
    name = "optuna-nsga2"
    multi_objective = True

    def __init__(self, space: SearchSpace, *, population: int = 50, **kwargs) -> None:
        self.population_size = population
        super().__init__(space, **kwargs)

    def _sampler(self) -> optuna.samplers.BaseSampler:
        return optuna.samplers.NSGAIISampler(population_size=self.population_size, seed=self.seed)
