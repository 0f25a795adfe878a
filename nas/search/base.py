"""The interface every search algorithm implements, and what they share.

An algorithm proposes candidates (``ask``), is told their scores (``tell``), and can be saved
and restored (``state_dict`` / ``restore``). It never proposes a candidate outside the space,
outside the budget, or one already evaluated. Its state *is* its evaluation history: restoring
replays that history through the same seeded algorithm, so a resumed search proposes exactly
the candidates an uninterrupted one would, and nothing is evaluated twice.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from nas.search.anchors import anchors
from nas.space.cost import added_flops, subnet_params
from nas.space.search_space import SearchSpace
from nas.space.subnet import Subnet


@dataclass(frozen=True)
class Evaluated:
    """A scored candidate: validation accuracy (higher is better) and its cost."""

    subnet: Subnet
    score: float
    cost: float
    round: int = 0  # the ask/tell round (a generation for evolution)

    def to_data(self) -> dict[str, Any]:
        return {
            "subnet": self.subnet.to_data(),
            "score": self.score,
            "cost": self.cost,
            "round": self.round,
        }

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> Evaluated:
        return cls(
            Subnet.from_data(data["subnet"]),
            float(data["score"]),
            float(data["cost"]),
            int(data.get("round", 0)),
        )


class SearchAlgorithm(ABC):
    """Base of the search algorithms.

    Args:
        space: the search space (its budget bounds what may be proposed).
        seed: all randomness comes from it.
        cost: ``"params"`` (trainable module parameters) or ``"flops"`` (added FLOPs), the
            cost recorded with each candidate and traded against accuracy by multi-objective
            algorithms.
        named_anchors: subnets the spec names (its baselines), which the algorithms that
            use anchors evaluate first with the space's own (set by the pipeline).
    """

    name: ClassVar[str]
    #: closed ranges of the float options whose values are bounded (e.g. probabilities);
    #: any other float option takes a finite number >= 0
    option_ranges: ClassVar[dict[str, tuple[float, float]]] = {}
    #: candidates the algorithm expects to evaluate in all (for progress and time estimates)
    planned: int = 0

    def __init__(
        self,
        space: SearchSpace,
        *,
        seed: int = 0,
        cost: str = "params",
        named_anchors: Sequence[Subnet] = (),
    ) -> None:
        if cost not in ("params", "flops"):
            raise ValueError(f"cost must be 'params' or 'flops', not {cost!r}")
        self.space = space
        #: subnets the spec names (baselines, imported configs): anchors where one is used
        self.named_anchors = tuple(named_anchors)
        self.seed = seed
        self.cost_metric = cost
        self.history: list[Evaluated] = []
        self.round = 0
        self._seen: set[Subnet] = set()
        self._pending: list[Subnet] | None = None
        self._geometry = space.geometry

    # -- what subclasses implement ---------------------------------------------------------
    @abstractmethod
    def _propose(self) -> list[Subnet]:
        """The next round's candidates (unseen, legal); empty once finished."""

    def _observe(self, results: Sequence[Evaluated]) -> None:  # noqa: B027 - optional hook
        """Update the algorithm's own model with newly told results."""

    # -- shared ----------------------------------------------------------------------------
    def ask(self) -> list[Subnet]:
        """The next candidates to evaluate (unseen, in the space and the budget); an empty
        list once the search is finished. Tell the results of a round before asking again."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            return pending
        return self._propose()

    def tell(self, results: Sequence[Evaluated]) -> None:
        for r in results:
            if r.subnet in self._seen:
                raise ValueError(f"candidate {r.subnet} was already told")
            self._seen.add(r.subnet)
            self.history.append(r)
        self._observe(results)
        self.round += 1

    @property
    def finished(self) -> bool:
        return False

    def seen(self, subnet: Subnet) -> bool:
        return subnet in self._seen

    def legal(self, subnet: Subnet) -> bool:
        """In the space, within the budget."""
        return self.space.admits(subnet)

    def cost(self, subnet: Subnet) -> float:
        if self.cost_metric == "flops":
            return float(added_flops(subnet, self._geometry))
        return float(subnet_params(subnet, self._geometry))

    def best(self, k: int = 1) -> list[Evaluated]:
        """The ``k`` best evaluated candidates by score (ties: the cheaper, then the earlier)."""
        order = sorted(enumerate(self.history), key=lambda t: (-t[1].score, t[1].cost, t[0]))
        return [e for _, e in order[:k]]

    def anchors(self) -> list[Subnet]:
        """The space's anchors and the spec's named subnets (``nas.search.anchors``), the
        legal unseen ones, in order."""
        return [s for s in anchors(self.space, self.named_anchors) if not self.seen(s)]

    def random_legal(self, rng: random.Random, exclude: set[Subnet], attempts: int = 200):
        """A random legal unseen subnet not in ``exclude`` (None after ``attempts`` tries)."""
        for _ in range(attempts):
            s = self.space.sample(rng)
            if s not in self._seen and s not in exclude and self.legal(s):
                return s
        return None

    def run(
        self,
        score: Callable[[list[Subnet]], list[float]],
        known: dict[Subnet, Evaluated] | None = None,
        on_scored: Callable[[Evaluated], None] | None = None,
        on_round: Callable[[list[Subnet]], None] | None = None,
    ) -> None:
        """Ask, score and tell until finished. ``score`` gets the round's candidates that
        ``known`` (a restored run's results, filled in as candidates are scored) does not hold,
        so that no candidate is scored twice; ``on_scored`` sees each new result as it
        comes, ``on_round`` each finished round."""
        known = {} if known is None else known
        while not self.finished:
            batch = self.ask()
            if not batch:
                break
            fresh = [c for c in batch if c not in known]
            for subnet, value in zip(fresh, score(fresh), strict=True):
                known[subnet] = Evaluated(subnet, value, self.cost(subnet), self.round)
                if on_scored is not None:
                    on_scored(known[subnet])
            self.tell([known[c] for c in batch])
            if on_round is not None:
                on_round(batch)

    def state_dict(self) -> dict[str, Any]:
        return {
            "algorithm": self.name,
            "seed": self.seed,
            "history": [e.to_data() for e in self.history],
        }

    def restore(self, history: Sequence[Evaluated]) -> None:
        """Bring a fresh algorithm to where it was after ``history`` by replaying it: every
        round the history answers completely is told; a round it answers only in part (the
        search was stopped during it) is asked again by the next ``ask``, whose caller answers
        the evaluated part from its results instead of evaluating again."""
        by_subnet = {e.subnet: e for e in history}
        used = 0
        while used < len(by_subnet):
            proposed = self._propose()
            if not proposed:
                break
            answered = [by_subnet[s] for s in proposed if s in by_subnet]
            if len(answered) < len(proposed):
                if used + len(answered) < len(by_subnet):
                    missing = next(s for s in proposed if s not in by_subnet)
                    raise ValueError(
                        f"the history does not come from {self.name} with seed {self.seed}: "
                        f"it would have evaluated {missing} first"
                    )
                self._pending = proposed
                return
            self.tell(answered)
            used += len(answered)


def pareto_front(history: Sequence[Evaluated]) -> list[Evaluated]:
    """Candidates that no other beats on both accuracy (higher) and cost (lower), cheapest
    first (of exact ties, the first evaluated)."""
    front, best = [], -1.0
    for e in sorted(history, key=lambda e: (e.cost, -e.score)):
        if e.score > best:
            front.append(e)
            best = e.score
    return front
