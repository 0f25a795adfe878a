"""Evolutionary search as NOAH runs it (from AutoFormer).

Generation 0 is up to ``population`` random legal candidates. After each generation the
``top_k`` best of everything evaluated are the parents of ``mutations`` mutants (per module:
depth resampled with ``s_prob``, each layer's dim with ``m_prob``) and ``crossovers`` children
(each module's setting from one of two parents); random legal candidates fill the generation up
to ``population``. Illegal (out of space or budget) and already-evaluated candidates are
rejected before evaluation. NOAH's defaults: 50 / 10 / 25 / 25, m_prob 0.2, s_prob 0.4.
"""

from __future__ import annotations

import random
from typing import ClassVar

from nas.search.base import SearchAlgorithm
from nas.search.operators import mutate
from nas.space import SearchSpace
from nas.subnet import Subnet


class Evolution(SearchAlgorithm):
    name = "evolution"
    option_ranges: ClassVar[dict[str, tuple[float, float]]] = {
        "m_prob": (0.0, 1.0),  # probabilities
        "s_prob": (0.0, 1.0),
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
    ) -> None:
        super().__init__(space, seed=seed, cost=cost)
        self.generations, self.population, self.top_k = generations, population, top_k
        self.mutations, self.crossovers = mutations, crossovers
        self.m_prob, self.s_prob = m_prob, s_prob
        self.max_attempts = max_attempts
        self.planned = generations * population
        self.rng = random.Random(seed)

    @property
    def finished(self) -> bool:
        return self.round >= self.generations

    def mutate(self, parent: Subnet) -> Subnet:
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
            if child not in taken and not self.seen(child) and self.legal(child):
                out.append(child)
                taken.add(child)
        return out

    def _propose(self) -> list[Subnet]:
        if self.finished:
            return []
        taken: set[Subnet] = set()
        candidates: list[Subnet] = []
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
