"""Search algorithms behind one interface (``SearchAlgorithm``): evolution, Optuna TPE and
NSGA-II, and random search. They run without Ray; the pipeline drives them."""

from __future__ import annotations

from typing import Any

from nas.errors import NasError
from nas.search.base import Evaluated, SearchAlgorithm
from nas.search.evolution import Evolution
from nas.search.optuna_search import NSGA2Search, TPESearch
from nas.search.random_search import RandomSearch
from nas.space import SearchSpace

ALGORITHMS: dict[str, type[SearchAlgorithm]] = {
    cls.name: cls for cls in (Evolution, TPESearch, NSGA2Search, RandomSearch)
}


def make_search(name: str, space: SearchSpace, **options: Any) -> SearchAlgorithm:
    """An algorithm by name with its options (see each class for what it takes)."""
    try:
        cls = ALGORITHMS[name]
    except KeyError:
        raise NasError(
            f"unknown search algorithm {name!r}; known: {', '.join(ALGORITHMS)}"
        ) from None
    return cls(space, **options)


__all__ = [
    "ALGORITHMS",
    "Evaluated",
    "Evolution",
    "NSGA2Search",
    "RandomSearch",
    "SearchAlgorithm",
    "TPESearch",
    "make_search",
]
