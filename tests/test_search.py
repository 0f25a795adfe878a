"""Search algorithms without Ray: legal, unseen proposals; deterministic replay; Pareto fronts."""

from __future__ import annotations

import random

import pytest

from nas.core.errors import NasError
from nas.core.yamlio import parse_yaml
from nas.search import ALGORITHMS, Evaluated, make_search
from nas.search.optuna_search import NSGA2Search
from nas.space.cost import subnet_params
from nas.space.search_space import parse_space
from tests.conftest import small_space_yaml

# Its module-scoped fixtures run once: under pytest-xdist every test here goes to one worker.
pytestmark = pytest.mark.xdist_group("search")

OPTIONS = {
    "evolution": {"generations": 4, "population": 16, "top_k": 4, "mutations": 6, "crossovers": 6},
    "optuna-tpe": {"num_candidates": 48, "batch_size": 8},
    "optuna-nsga2": {"num_candidates": 48, "batch_size": 8, "population": 8},
    "random": {"num_candidates": 48, "batch_size": 16},
}


@pytest.fixture(scope="module")
def space():
    # A budget that binds: it excludes a large part of the space.
    return parse_space(parse_yaml(small_space_yaml(extra="budget: {params: {max: 3000}}")))


def score(space, subnet) -> float:
    """A deterministic stand-in for validation accuracy that prefers some structure."""
    noise = random.Random(subnet.key()).random() * 0.05
    return 0.5 + noise + 0.1 * len(subnet["lora"]) - 0.02 * len(subnet["vpt"])


def run(space, name, seed=0, stop_after=None, history=None):
    algo = make_search(name, space, seed=seed, **OPTIONS[name])
    if history is not None:
        algo.restore(history)
    while not algo.finished:
        batch = algo.ask()
        if not batch:
            break
        known = {e.subnet: e for e in (history or [])}
        algo.tell(
            [known.get(s) or Evaluated(s, score(space, s), algo.cost(s), algo.round) for s in batch]
        )
        if stop_after is not None and len(algo.history) >= stop_after:
            break
    return algo


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_proposes_only_legal_unseen_candidates(space, name):
    algo = make_search(name, space, seed=3, **OPTIONS[name])
    seen = set()
    rounds = 0
    while True:
        batch = algo.ask()
        if not batch:
            break
        rounds += 1
        assert len(batch) == len(set(batch))
        for s in batch:
            assert space.contains(s), s
            assert subnet_params(s, space.geometry) <= 3000, s
            assert s not in seen, f"{s} proposed twice"
            seen.add(s)
        algo.tell([Evaluated(s, score(space, s), algo.cost(s), algo.round) for s in batch])
    assert len(seen) == len(algo.history) == algo.planned
    assert rounds >= 3
    assert algo.best(1)[0].score == max(e.score for e in algo.history)


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_restore_replays_to_the_same_search(space, name):
    full = run(space, name, seed=5)
    # Stopped in the middle of a round: the first 21 evaluations survive.
    resumed = run(space, name, seed=5, history=full.history[:21])
    assert [e.subnet for e in resumed.history] == [e.subnet for e in full.history]
    assert [e.score for e in resumed.history] == [e.score for e in full.history]


def test_restore_refuses_a_foreign_history(space):
    other = run(space, "random", seed=1)
    algo = make_search("random", space, seed=2, **OPTIONS["random"])
    with pytest.raises(ValueError, match="does not come from random with seed 2"):
        algo.restore(other.history)


def test_evolution_breeds_from_the_best(space):
    algo = run(space, "evolution", seed=0)
    gen0 = [e for e in algo.history if e.round == 0]
    later = [e for e in algo.history if e.round == 3]
    assert len(gen0) == 16
    assert sum(e.score for e in later) / len(later) > sum(e.score for e in gen0) / len(gen0)


def test_nsga2_pareto_front(space):
    algo = run(space, "optuna-nsga2", seed=0)
    assert isinstance(algo, NSGA2Search)
    front = algo.pareto_front()
    assert front
    for e in front:
        assert not any(o.score > e.score and o.cost <= e.cost for o in algo.history)
    assert [e.cost for e in front] == sorted(e.cost for e in front)


def test_unknown_algorithm():
    with pytest.raises(NasError, match="unknown search algorithm 'bayes'; known: evolution"):
        make_search("bayes", None)


def test_float_options_take_their_declared_range_not_always_a_probability(monkeypatch):
    """A float option is a probability only where the algorithm says so; another one (here
    a made-up ``temperature`` defaulting to 2.0) may be set to its own default."""
    from nas.search import option_problem
    from nas.search.random_search import RandomSearch

    class Tempered(RandomSearch):
        name = "tempered"

        def __init__(self, space, *, temperature: float = 2.0, **kwargs) -> None:
            super().__init__(space, **kwargs)

    monkeypatch.setitem(ALGORITHMS, "tempered", Tempered)
    assert option_problem("tempered", "temperature", 2.0) is None
    assert option_problem("tempered", "temperature", -1.0) == "expected a number >= 0, got -1.0"
    assert "expected a number" in option_problem("tempered", "temperature", float("nan"))
    assert option_problem("evolution", "m_prob", 0.5) is None
    assert option_problem("evolution", "m_prob", 2.0) == (
        "expected a probability between 0 and 1, got 2.0"
    )


def _noah_layered_mutation(space, choice, rng, m_prob, s_prob):
    """NOAH / AutoFormer's layered mutation as written per kind before the spaces became data
    (the reference the generic operator must reproduce draw for draw)."""
    from nas.modules.spaces import trim

    dims = list(trim(choice))
    depth = min((d for d in space.depths if d >= len(dims)), default=len(dims))
    dims += [0] * (depth - len(dims))
    if rng.random() < s_prob:
        depth = rng.choice(space.depths)
        dims = dims[:depth] + [rng.choice(space.dims) for _ in range(depth - len(dims))]
    dims = [rng.choice(space.dims) if rng.random() < m_prob else d for d in dims]
    return trim(dims)


def test_mutation_on_spaces_as_data_is_noahs_draw_for_draw(space):
    """The generic mutation reads a kind's parameters (a structural depth, conditional dims)
    and gives the very candidates the per-kind code gave, from the same random stream."""
    from nas.search.operators import mutate

    draws = random.Random(5)
    for kind, module_space in space.modules.items():
        for _ in range(300):
            choice = module_space.sample(draws)
            m, s, seed = draws.random(), draws.random(), draws.randrange(10**6)
            ours = mutate(module_space, choice, random.Random(seed), m, s)
            noah = _noah_layered_mutation(module_space, choice, random.Random(seed), m, s)
            assert ours == noah, (kind, choice)
            assert module_space.contains(ours)


def test_optuna_asks_a_conditional_parameter_only_when_it_exists(space):
    """The depth switches the layer dims on: a fixed trial holding only the active ones is
    enough (Optuna's FixedTrial refuses a parameter it was not given), and so for UPT's n_ctx,
    which exists only for a mode with context."""
    import optuna

    from nas.modules.upt_kind import UPTSpace
    from nas.search.operators import suggest

    lora = space.modules["lora"]  # depths [2, 4], dims [1, 4]
    trial = optuna.trial.FixedTrial({"lora.depth": 2, "lora.dim0": 4, "lora.dim1": 1})
    assert suggest(lora, trial, "lora.") == (4, 1)
    with pytest.raises(ValueError):  # depth 4 needs dim2 and dim3, which were not given
        suggest(lora, optuna.trial.FixedTrial({"depth": 4, "dim0": 4, "dim1": 4}), "")
    upt = UPTSpace(modes=("none", "text"), n_ctx=(2, 4), options={})
    assert suggest(upt, optuna.trial.FixedTrial({"mode": "none"}), "") == ()
    assert suggest(upt, optuna.trial.FixedTrial({"mode": "text", "n_ctx": 4}), "") == ("text", 4)
    for choice in upt.choices():
        assert upt.decode(upt.encode(choice)) == choice


def test_no_module_file_holds_search_code():
    """A module kind is its runtime class and its space as data; the search algorithms' code
    (Optuna's trials, evolution's operators) lives in nas/search alone."""
    from pathlib import Path

    import nas.modules

    for path in Path(nas.modules.__file__).parent.glob("*.py"):
        text = path.read_text()
        for word in ("optuna", "suggest_categorical", "def mutate", "def suggest", "rng.random()"):
            assert word not in text, f"{path.name} holds {word!r}"


def test_pgn_mutation_on_its_parameters_is_the_per_axis_one_draw_for_draw():
    """PGN's axes are independent parameters: each resampled with ``m_prob``, as before."""
    from nas.modules.pgn import PGN
    from nas.search.operators import mutate
    from nas.space.search_space import load_space

    pgn = load_space("noah_pgn_cpu").modules["pgn"]
    draws = random.Random(7)
    for _ in range(300):
        choice = pgn.sample(draws) if draws.random() < 0.9 else ()
        m, s, seed = draws.random(), draws.random(), draws.randrange(10**6)
        rng = random.Random(seed)
        start = PGN.canonical(choice) or pgn.sample(rng)
        axes = zip(start, pgn._axes(), strict=True)
        noah = tuple(rng.choice(axis) if rng.random() < m else v for v, axis in axes)
        assert mutate(pgn, choice, random.Random(seed), m, s) == noah


def test_upt_mutation_on_its_parameters_is_the_per_kind_one_draw_for_draw():
    """UPT's n_ctx exists only for a mode with context but is carried (latent) through mode
    ``none``: the generic mutation then makes UPT's own draws, in its order, for every
    choice including the zero-shot one."""
    from nas.modules.upt import UPT
    from nas.modules.upt_kind import UPTSpace
    from nas.search.operators import mutate

    def per_kind(space, choice, rng, m_prob, s_prob):  # UPT's mutation as it was written
        choice = UPT.canonical(choice)
        mode = choice[0] if choice else "none"
        n = choice[1] if choice else rng.choice(space.n_ctx)
        if rng.random() < s_prob:
            mode = rng.choice(space.modes)
        if rng.random() < m_prob:
            n = rng.choice(space.n_ctx)
        return () if mode == "none" else (mode, n)

    upt = UPTSpace(modes=("none", "text", "unified"), n_ctx=(2, 4, 8), options={})
    draws = random.Random(11)
    for _ in range(500):
        choice = draws.choice(list(upt.choices()))
        m, s, seed = draws.random(), draws.random(), draws.randrange(10**6)
        ours = mutate(upt, choice, random.Random(seed), m, s)
        assert ours == per_kind(upt, choice, random.Random(seed), m, s), choice
