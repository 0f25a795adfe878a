"""The search operators, on any module kind's space read as data (``ModuleSpace.parameters``:
categorical parameters, some conditional on others): a new kind needs none of its own, and a
new algorithm builds on these or on the parameters directly, touching no module file."""

from __future__ import annotations

import random
from typing import Any

from nas.modules.spaces import Choice, ModuleSpace, Param


def suggest(space: ModuleSpace, trial: Any, prefix: str) -> Choice:
    """The choice as Optuna parameters (define-by-run: a conditional parameter is asked only
    when its condition holds of the values asked before it)."""
    values: dict[str, Any] = {}
    for param in space.parameters():
        if param.active(values):
            values[param.name] = trial.suggest_categorical(prefix + param.name, list(param.values))
    return space.decode(values)


def mutate(
    space: ModuleSpace, choice: Choice, rng: random.Random, m_prob: float, s_prob: float
) -> Choice:
    """NOAH / AutoFormer's mutation of one module's choice: the values the choice lacks (a
    module not used: its parameters; a latent one) drawn at random first; each structural
    parameter (a depth, a mode) resampled with probability ``s_prob``, and the parameters this
    switches on given random values (a new layer's dim); then every other parameter that
    exists (or is latent) resampled with probability ``m_prob``."""
    params = space.parameters()
    values = space.encode(choice)

    def carried(param: Param) -> bool:
        return param.latent or param.active(values)

    for param in params:
        if param.name not in values and carried(param):
            values[param.name] = rng.choice(param.values)
    for param in params:
        if param.structural and param.active(values) and rng.random() < s_prob:
            values[param.name] = rng.choice(param.values)
    for param in params:
        if param.name not in values and param.active(values):
            values[param.name] = rng.choice(param.values)
    for param in params:
        if not param.structural and carried(param) and rng.random() < m_prob:
            values[param.name] = rng.choice(param.values)
    return space.decode({p.name: values[p.name] for p in params if p.active(values)})
