"""Evolutionary search as NOAH runs it (from AutoFormer).

Generation 0 is the space's anchors (``nas.search.anchors``: each module alone at the largest
size in budget, the largest subnet grown along each module, the spec's baselines; with
``anchors``), then random legal candidates up to ``population``. After each generation the
``top_k`` best of everything evaluated are the parents of ``mutations`` mutants and
``crossovers`` children (each module's setting from one of two parents); random legal
candidates fill the generation up to ``population``. A mutant is, with probability ``moves``, a
budget move of its parent (drop a module, grow one to the largest size that fits, move budget
from one to another), else NOAH's mutation (per module: depth resampled with ``s_prob``, each
layer's dim with ``m_prob``). Illegal (out of space or budget) and already-evaluated candidates
are rejected before evaluation. NOAH's own evolution: ``anchors: false, moves: 0`` with
50 / 10 / 25 / 25, m_prob 0.2, s_prob 0.4.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import ClassVar

from nas.search.anchors import move
from nas.search.base import SearchAlgorithm
from nas.search.operators import mutate
from nas.space.search_space import SearchSpace
from nas.space.subnet import Subnet


class Evolution(SearchAlgorithm):
    name = "evolution"
    option_ranges: ClassVar[dict[str, tuple[float, float]]] = {
        "m_prob": (0.0, 1.0),  # probabilities
        "s_prob": (0.0, 1.0),
        "moves": (0.0, 1.0),
    }

    def __init__(
        self,
        space: SearchSpace,
        *,
        generations: int = 20,
        population: int = 50,
        top_k: int = 10,
        mutations: int = 25,
        crossovers: int = 25,
        m_prob: float = 0.2,
        s_prob: float = 0.4,
        seed: int = 0,
        cost: str = "params",
        max_attempts: int = 50,
        anchors: bool = True,
        moves: float = 0.5,
        named_anchors: Sequence[Subnet] = (),
    ) -> None:
        super().__init__(space, seed=seed, cost=cost, named_anchors=named_anchors)
        self.use_anchors, self.moves = anchors, moves
        self.generations, self.population, self.top_k = generations, population, top_k
        self.mutations, self.crossovers = mutations, crossovers
        self.m_prob, self.s_prob = m_prob, s_prob
        self.max_attempts = max_attempts
        self.planned = generations * population
        self.rng = random.Random(seed)

    @property
    def finished(self) -> bool:
        return self.round >= self.generations

    def mutate(self, parent: Subnet) -> Subnet | None:
        if self.moves and self.rng.random() < self.moves:
            return move(self.space, parent, self.rng)
        return Subnet(
            {
                kind: mutate(space, parent[kind], self.rng, self.m_prob, self.s_prob)
                for kind, space in self.space.modules.items()
            }
        )

    def crossover(self, a: Subnet, b: Subnet) -> Subnet:
        return Subnet(
            {kind: (a if self.rng.random() < 0.5 else b)[kind] for kind in self.space.modules}
        )

    def _children(self, count: int, make, taken: set[Subnet]) -> list[Subnet]:
        out: list[Subnet] = []
        for _ in range(count * self.max_attempts):
            if len(out) == count:
                break
            child = make()
            if (
                child is not None
                and child not in taken
                and not self.seen(child)
                and self.legal(child)
            ):
                out.append(child)
                taken.add(child)
        return out

    def _propose(self) -> list[Subnet]:
        if self.finished:
            return []
        taken: set[Subnet] = set()
        candidates: list[Subnet] = []
        if not self.history and self.use_anchors:
            candidates += self.anchors()[: self.population]
            taken.update(candidates)
        if self.history:
            parents = [e.subnet for e in self.best(self.top_k)]
            candidates += self._children(
                self.mutations, lambda: self.mutate(self.rng.choice(parents)), taken
            )
            candidates += self._children(
                self.crossovers,
                lambda: self.crossover(self.rng.choice(parents), self.rng.choice(parents)),
                taken,
            )
        while len(candidates) < self.population:
            s = self.random_legal(self.rng, taken)
            if s is None:
                break
            candidates.append(s)
            taken.add(s)
        return candidates
