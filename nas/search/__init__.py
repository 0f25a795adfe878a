"""Search algorithms behind one interface (``SearchAlgorithm``): evolution, Optuna TPE and
NSGA-II, and random search. They run without Ray; the pipeline drives them."""

from __future__ import annotations

import math
from typing import Any

from nas.core.errors import NasError
from nas.core.registry import Registry
from nas.search.base import Evaluated, SearchAlgorithm
from nas.space.search_space import SearchSpace

#: The algorithms by name; a shipped one's module (Optuna's, say) is imported when asked for.
ALGORITHMS: Registry[type[SearchAlgorithm]] = Registry(
    "search algorithm",
    {
        "evolution": "nas.search.evolution:Evolution",
        "optuna-tpe": "nas.search.optuna_search:TPESearch",
        "optuna-nsga2": "nas.search.optuna_search:NSGA2Search",
        "random": "nas.search.random_search:RandomSearch",
    },
)


def register_algorithm(cls: type[SearchAlgorithm]) -> type[SearchAlgorithm]:
    """Add a ``SearchAlgorithm`` subclass to the registry under its ``name`` (once); its
    keyword-only ``__init__`` options become what ``stages.search.options`` accepts."""
    if not getattr(cls, "name", "") or cls.name in ALGORITHMS:
        raise ValueError(f"search algorithm {getattr(cls, 'name', '')!r}: empty or registered")
    ALGORITHMS[cls.name] = cls
    return cls


#: options the pipeline sets itself, not the spec
_SET_BY_PIPELINE = {"self", "space", "seed", "cost", "named_anchors"}
#: counts that may be 0 (an evolution of crossovers only, or of mutations only)
_MAY_BE_ZERO = {"mutations", "crossovers"}


def algorithm_options(name: str) -> dict[str, Any]:
    """The options ``stages.search.options`` may set for algorithm ``name``, with defaults."""
    import inspect

    options: dict[str, Any] = {}
    for cls in ALGORITHMS[name].__mro__:
        if "__init__" not in vars(cls) or cls is object:
            continue
        for p in inspect.signature(cls.__init__).parameters.values():
            if p.name not in _SET_BY_PIPELINE and p.kind is p.KEYWORD_ONLY:
                options.setdefault(p.name, p.default)
    return options


def option_problem(name: str, key: str, value: Any) -> str | None:
    """What is wrong with ``value`` as option ``key`` of algorithm ``name`` (None: nothing)."""
    known = algorithm_options(name)
    if key not in known:
        return f"not an option of {name}; its options: {', '.join(sorted(known))}"
    default = known[key]
    if isinstance(default, bool):
        if not isinstance(value, bool):
            return f"expected true or false, got {value!r}"
    elif isinstance(default, int):
        least = 0 if key in _MAY_BE_ZERO else 1
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            return f"expected an integer >= {least}, got {value!r}"
    elif isinstance(default, float):
        low, high = ALGORITHMS[name].option_ranges.get(key, (0.0, math.inf))
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or not low <= value <= high:
            if (low, high) == (0.0, 1.0):
                return f"expected a probability between 0 and 1, got {value!r}"
            if high == math.inf:
                return f"expected a number >= {low:g}, got {value!r}"
            return f"expected a number between {low:g} and {high:g}, got {value!r}"
    return None


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
    "SearchAlgorithm",
    "algorithm_options",
    "make_search",
    "option_problem",
    "register_algorithm",
]
