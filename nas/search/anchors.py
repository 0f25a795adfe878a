"""Anchors and budget moves: how a search reaches every point of its space.

NOAH's sampling and mutation draw each layer's size independently, so under a budget they
almost never propose "one module alone, as large as the budget allows" (in the PGN space that
subnet is drawn about once in two million draws), which is what a user tries first without a
search. Two remedies, shared by every algorithm:

- **anchors** (``anchors``): subnets a search evaluates first: each module kind alone at the
  largest size on its ladder that fits the budget, for each kind the largest mixed subnet
  grown along that kind, and any subnets the spec names (its baselines, imported NOAH configs);
- **budget moves** (``drop``, ``grow``, ``transfer``, ``step``): drop a whole module, grow one
  module to the largest size the remaining budget allows, move budget from one module to
  another, or move one module a single rung up or down its sizes.

Sizes come from each kind's *ladder* (``ModuleSpace.ladder``: a layered kind's uniform
choices, one dim on every layer of a depth; a small kind's every choice), smallest first.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

from nas.space.search_space import SearchSpace
from nas.space.subnet import Subnet

#: The budget moves, in the order an evolution draws them from.
MOVES = ("drop", "grow", "transfer", "step")


def floor(space: SearchSpace, kind: str):
    """A kind's least choice: absent where the space allows that, else its smallest."""
    return space.modules[kind].ladder(space.geometry)[0]


def _with(subnet: Subnet, kind: str, choice) -> Subnet:
    return Subnet({**{k: subnet[k] for k in subnet}, kind: choice})


def _floored(space: SearchSpace, subnet: Subnet) -> Subnet:
    """``subnet`` with every kind the space requires present (its floor where absent)."""
    choices = {k: subnet[k] for k in subnet}
    for kind, ms in space.modules.items():
        if not ms.contains(subnet[kind]):
            choices[kind] = floor(space, kind)
    return Subnet(choices)


def grow(space: SearchSpace, subnet: Subnet, kind: str) -> Subnet | None:
    """``kind`` set to the largest size on its ladder that keeps ``subnet`` in the budget
    (the other kinds unchanged); None when no size fits."""
    for choice in reversed(space.modules[kind].ladder(space.geometry)):
        candidate = _with(subnet, kind, choice)
        if space.admits(candidate):
            return candidate
    return None


def drop(space: SearchSpace, subnet: Subnet, kind: str) -> Subnet:
    """``kind`` removed (set to its floor: absent where the space allows it)."""
    return _with(subnet, kind, floor(space, kind))


def shrink(space: SearchSpace, subnet: Subnet, kind: str, rng: random.Random) -> Subnet:
    """``kind`` set to a random smaller size on its ladder (its floor included)."""
    ladder = space.modules[kind].ladder(space.geometry)
    g = space.geometry
    own = space.modules[kind].module.params(subnet[kind], g)
    smaller = [c for c in ladder if space.modules[kind].module.params(c, g) < own]
    return _with(subnet, kind, rng.choice(smaller)) if smaller else subnet


def transfer(
    space: SearchSpace, subnet: Subnet, source: str, target: str, rng: random.Random
) -> Subnet | None:
    """Budget moved from ``source`` to ``target``: the source shrunk to a smaller size (or
    dropped), then the target grown to the largest size that fits."""
    return grow(space, shrink(space, subnet, source, rng), target)


def step(space: SearchSpace, subnet: Subnet, kind: str, rng: random.Random) -> Subnet:
    """``kind`` one rung up or down its ladder from the rung nearest its size. Rungs that
    differ only in what costs nothing (an adapter's positions: the same widths, the same
    size) are one rung: one of them is drawn."""
    g = space.geometry
    module = space.modules[kind].module
    ladder = space.modules[kind].ladder(g)
    sizes = [module.params(c, g) for c in ladder]
    widths = getattr(module, "width_of", None)
    keys = [
        (size, tuple(map(widths, c)) if widths and isinstance(c, tuple) else c)
        for size, c in zip(sizes, ladder, strict=True)
    ]
    own = module.params(subnet[kind], g)
    at = min(range(len(ladder)), key=lambda i: abs(sizes[i] - own))
    direction = rng.choice((-1, 1))
    to = at + direction
    while 0 <= to < len(ladder) and keys[to] == keys[at]:
        to += direction
    if not 0 <= to < len(ladder):
        return subnet
    same = [c for c, key in zip(ladder, keys, strict=True) if key == keys[to]]
    return _with(subnet, kind, same[0] if len(same) == 1 else rng.choice(same))


def move(space: SearchSpace, subnet: Subnet, rng: random.Random) -> Subnet | None:
    """One budget move of ``subnet``, drawn at random: drop a present kind, grow a kind, move
    budget between two kinds, or step one kind a rung up or down its ladder (None when the
    drawn move finds nothing in the budget)."""
    kinds = list(space.modules)
    name = rng.choice(MOVES if len(kinds) > 1 else ("drop", "grow", "step"))
    if name == "step":
        return step(space, subnet, rng.choice(kinds), rng)
    if name == "drop":
        present = [k for k in kinds if subnet[k] != floor(space, k)]
        return drop(space, subnet, rng.choice(present)) if present else None
    if name == "grow":
        return grow(space, subnet, rng.choice(kinds))
    source, target = rng.sample(kinds, 2)
    return transfer(space, subnet, source, target, rng)


def anchors(space: SearchSpace, named: Iterable[Subnet] = ()) -> list[Subnet]:
    """The subnets a search evaluates first, each once and each in the space and budget:

    1. every kind alone (the others at their floor) at the largest size that fits;
    2. per kind, the largest *balanced* subnet (every kind at the same rung of its ladder,
       as far up as the budget allows) with that kind then grown as far as the rest allows;
    3. ``named``: the spec's own (baselines, imported configs), where the space admits them.
    """
    base = Subnet({kind: floor(space, kind) for kind in space.modules})
    out: list[Subnet] = []
    for kind in space.modules:
        out.append(grow(space, base, kind))
    balanced = _balanced(space)
    if balanced is not None:
        out += [grow(space, balanced, kind) for kind in space.modules]
    out += [_floored(space, s) for s in named]
    seen: set[Subnet] = set()
    unique = []
    for s in out:
        if s is not None and s not in seen and space.admits(s):
            seen.add(s)
            unique.append(s)
    return unique


def _balanced(space: SearchSpace, steps: int = 64) -> Subnet | None:
    """The largest subnet in the budget with every kind at the same fraction of its ladder."""
    g = space.geometry
    ladders = {k: ms.ladder(g) for k, ms in space.modules.items()}
    best = None
    for i in range(steps + 1):
        t = i / steps
        s = Subnet({k: lad[round(t * (len(lad) - 1))] for k, lad in ladders.items()})
        if space.admits(s):
            best = s
    return best
