"""How the supernet draws the subnets it trains (issue 20).

NOAH draws, per mini-batch, a uniform depth per module and then a uniform dim per layer. That
distribution rarely reaches full-depth or near-largest subnets, and most of what it draws lies
outside a tight budget, so the supernet trains subnets the search never considers. Two levers:

- ``in_budget``: draws outside the space's budget are rejected and drawn again, so the supernet
  trains the subnets a user searches;
- ``balanced``: draws are spread evenly over subnet *sizes* (trainable parameters): a size bin
  is picked uniformly, then subnets are drawn from NOAH's sampler leaned towards larger or
  smaller choices until one lands in the bin (after 64 tries, the nearest one drawn);
- ``anchor_share``: that share of the draws is one of the search's anchors (each module alone
  at its largest size in budget, the largest subnets along each module: ``nas.search.anchors``),
  so that the subnets a search evaluates first are trained as such.

A sampler is a plain function ``rng -> Subnet``, as ``nas.training.train`` takes it. With
``in_budget``, the sandwich rule's ends and the distillation teacher are the largest and the
smallest subnets *in the budget* (``sandwich_ends``), not the whole supernet.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from nas.core.errors import NasError
from nas.search.anchors import anchors
from nas.space.cost import subnet_params
from nas.space.search_space import SearchSpace
from nas.space.subnet import Subnet
from nas.training.train import SupernetSteps

if TYPE_CHECKING:
    from nas.training.train import SupernetSteps

STRATEGIES = ("uniform", "balanced")
#: Draws tried before a rejecting sampler gives up.
MAX_ATTEMPTS = 10_000
#: Size bins of the balanced sampler, and the lean of its draws (weights exp(tilt * rank)).
BINS, MAX_TILT, BIN_ATTEMPTS = 8, 4.0, 64

Sampler = Callable[[random.Random], Subnet]


def make_sampler(space: SearchSpace, strategy: str = "uniform", in_budget: bool = False) -> Sampler:
    """The supernet's per-draw sampler. ``uniform`` with ``in_budget=False`` is NOAH's
    ``space.sample`` itself (the same draws from the same random stream)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"sampling strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
    restrict = in_budget and space.budget.is_set
    if strategy == "uniform":
        return _in_budget(space, space.sample) if restrict else space.sample
    return _balanced(space, restrict)


def _in_budget(space: SearchSpace, draw: Sampler) -> Sampler:
    def sample(rng: random.Random) -> Subnet:
        for _ in range(MAX_ATTEMPTS):
            subnet = draw(rng)
            if space.admits(subnet):
                return subnet
        raise NasError(
            f"supernet sampling: none of {MAX_ATTEMPTS:,} draws of space {space.name!r} met its "
            f"budget ({space.budget.params}); widen the budget or sample with in_budget: false"
        )

    return sample


def _tilted(space: SearchSpace, rng: random.Random, tilt: float) -> Subnet:
    return Subnet({k: s.sample_tilted(rng, tilt) for k, s in space.modules.items()})


def size_range(space: SearchSpace, in_budget: bool) -> tuple[float, float]:
    """The trainable-parameter range the balanced sampler spreads its draws over."""
    g = space.geometry
    low, high = float(subnet_params(space.smallest(), g)), float(subnet_params(space.largest(), g))
    if in_budget:
        bounds = space.budget.params
        low = max(low, bounds.low) if bounds.low is not None else low
        high = min(high, bounds.high) if bounds.high is not None else high
    return low, max(low, high)


def _balanced(space: SearchSpace, in_budget: bool) -> Sampler:
    g = space.geometry
    low, high = size_range(space, in_budget)
    width = (high - low) / BINS or 1.0
    fallback = _in_budget(space, space.sample) if in_budget else space.sample

    def sample(rng: random.Random) -> Subnet:
        target = rng.randrange(BINS)
        centre = low + (target + 0.5) * width
        best, best_gap = None, float("inf")
        for _ in range(BIN_ATTEMPTS):
            subnet = _tilted(space, rng, rng.uniform(-MAX_TILT, MAX_TILT))
            if in_budget and not space.admits(subnet):
                continue
            params = subnet_params(subnet, g)
            if min(int((params - low) / width), BINS - 1) == target:
                return subnet
            if abs(params - centre) < best_gap:
                best, best_gap = subnet, abs(params - centre)
        return best if best is not None else fallback(rng)

    return sample


def acceptance(space: SearchSpace, draws: int = 2_000, seed: int = 0) -> float:
    """The share of NOAH's draws that meet the space's budget."""
    rng = random.Random(seed)
    return sum(space.admits(space.sample(rng)) for _ in range(draws)) / draws


def sandwich_ends(space: SearchSpace, in_budget: bool) -> tuple[Subnet, Subnet]:
    """(largest, smallest) subnet for the sandwich rule and the distillation teacher: the
    space's own, or with ``in_budget`` the largest and smallest in the budget among the
    uniform subnets (every module kind at its deepest with one dim, or at its own largest or
    smallest choice; 2,000 in-budget draws when none of those fits): the ones with the most
    and the fewest trainable parameters."""
    largest, smallest = space.largest(), space.smallest()
    if not in_budget or not space.budget.is_set:
        return largest, smallest
    g = space.geometry
    candidates = [largest, smallest]
    options = []
    for kind, ms in space.modules.items():
        if hasattr(ms, "dims") and hasattr(ms, "depths"):
            # one dim per layer size (an adapter's positions cost alike): the last of each
            by_size = {ms.module.layer_params(d, g): d for d in ms.ordered_dims()}
            options.append([(kind, (d,) * max(ms.depths)) for d in by_size.values()])
        else:
            options.append([(kind, ms.largest(g)), (kind, ms.smallest(g))])
    candidates += [Subnet(dict(combo)) for combo in itertools.product(*options)]
    if not any(space.admits(s) for s in candidates):  # none of those fits: search draws
        rng = random.Random(0)
        draw = _in_budget(space, space.sample)
        candidates += [draw(rng) for _ in range(2_000)]
    admitted = sorted(
        {s for s in candidates if space.admits(s)}, key=lambda s: (subnet_params(s, g), str(s))
    )
    return admitted[-1], admitted[0]


def with_anchors(draw: Sampler, anchors: Sequence[Subnet], share: float) -> Sampler:
    """``draw``, except that a ``share`` of the draws is one of ``anchors`` (uniformly): the
    subnets the search evaluates first (``nas.search.anchors``) are trained as such. A share
    of 0 is ``draw`` itself (the same draws from the same random stream)."""
    if share <= 0 or not anchors:
        return draw
    anchors = list(anchors)

    def sample(rng: random.Random) -> Subnet:
        return rng.choice(anchors) if rng.random() < share else draw(rng)

    return sample


def supernet_steps(space: SearchSpace, stage: Any, named: Iterable[Subnet] = ()) -> SupernetSteps:
    """What each supernet training step trains, as a ``SupernetSettings``'s sampling settings
    (``sampling``, ``in_budget``, ``subnets_per_step``, ``sandwich``, ``distill``,
    ``anchor_share``) say; ``named``: the spec's own subnets, anchors with the space's."""

    largest, smallest = sandwich_ends(space, stage.in_budget)
    draw = make_sampler(space, stage.sampling, stage.in_budget)
    if stage.anchor_share > 0:
        draw = with_anchors(draw, anchors(space, named), stage.anchor_share)
    return SupernetSteps(
        draw,
        per_step=stage.subnets_per_step,
        sandwich=stage.sandwich,
        largest=largest,
        smallest=smallest,
        distill=stage.distill,
    )
