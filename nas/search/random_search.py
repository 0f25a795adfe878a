"""Random search: legal, unseen candidates drawn with NOAH's sampling, ``batch_size`` a round;
no anchors (it is the control a search is measured against)."""

from __future__ import annotations

import random
from collections.abc import Sequence

from nas.search.base import SearchAlgorithm
from nas.space.search_space import SearchSpace
from nas.space.subnet import Subnet


class RandomSearch(SearchAlgorithm):
    name = "random"

    def __init__(
        self,
        space: SearchSpace,
        *,
        num_candidates: int = 1000,
        batch_size: int = 50,
        seed: int = 0,
        cost: str = "params",
        named_anchors: Sequence[Subnet] = (),  # not used: random search is the control
    ) -> None:
        super().__init__(space, seed=seed, cost=cost, named_anchors=named_anchors)
        self.planned = num_candidates
        self.batch_size = batch_size
        self.rng = random.Random(seed)

    @property
    def finished(self) -> bool:
        return len(self.history) >= self.planned

    def _propose(self) -> list[Subnet]:
        out: list[Subnet] = []
        want = min(self.batch_size, self.planned - len(self.history))
        while len(out) < want:
            s = self.random_legal(self.rng, set(out))
            if s is None:  # the legal part of the space is exhausted
                break
            out.append(s)
        return out
