"""sr3fast.study.plan: each participant's trial order is balanced (per cell, over time, left and
right) and reproducible from the participant's seed."""
from __future__ import annotations

import random
from collections import Counter

import pytest

from sr3fast.study.plan import cell_of, interleave, make_plan, participant_seed


def trials(models=("a", "b"), items=7, attention=3):
    """A study's trials as `study make` lists them: every model on every item in both variants,
    plus `attention` attention checks per variant. 7 items: the model cells have odd sizes."""
    listed = []
    for variant in ("with_input", "without_input"):
        for model in models:
            listed += [{"kind": "model", "model": model, "item": f"i{k}", "variant": variant} for k in range(items)]
        listed += [{"kind": "attention", "model": None, "item": f"i{k}", "variant": variant}
                   for k in range(attention)]
    return [{"id": f"t{n:03d}", **trial} for n, trial in enumerate(listed)]


TRIALS = trials()
BY_ID = {trial["id"]: trial for trial in TRIALS}


@pytest.mark.parametrize("seed", range(20))
def test_every_trial_once_and_cells_equal(seed):
    plan = make_plan(TRIALS, seed)
    assert sorted(p.trial for p in plan) == sorted(BY_ID)
    cells = Counter(cell_of(BY_ID[p.trial]) for p in plan)
    # each model in each variant: 7 trials; each variant's attention checks: 3
    assert cells == {("model", m, v): 7 for m in ("a", "b") for v in ("with_input", "without_input")} | \
        {("attention", None, v): 3 for v in ("with_input", "without_input")}


@pytest.mark.parametrize("seed", range(20))
def test_sides_balanced_overall_and_per_cell(seed):
    plan = make_plan(TRIALS, seed)
    sides = Counter(p.model_side for p in plan)
    assert set(sides) <= {"left", "right"}
    assert abs(sides["left"] - sides["right"]) <= 1          # 34 trials: exactly 17 and 17
    assert sides["left"] == sides["right"] == 17
    per_cell: dict = {}
    for p in plan:
        per_cell.setdefault(cell_of(BY_ID[p.trial]), Counter())[p.model_side] += 1
    for counts in per_cell.values():
        assert abs(counts["left"] - counts["right"]) <= 1


@pytest.mark.parametrize("seed", range(20))
def test_cells_spread_evenly_through_the_session(seed):
    """After every p trials, each cell has had its share p * n_c / N rounded down or up: no model
    or variant is bunched at the start or the end."""
    plan = make_plan(TRIALS, seed)
    size = Counter(map(cell_of, TRIALS))
    seen = Counter()
    for position, planned in enumerate(plan, start=1):
        seen[cell_of(BY_ID[planned.trial])] += 1
        for cell, total in size.items():
            share = position * total
            assert share // len(plan) <= seen[cell] <= -(-share // len(plan)), (position, cell)


@pytest.mark.parametrize("seed", range(200))
def test_interleave_keeps_quota_for_any_cell_sizes(seed):
    """The quota property for random cell sizes, 1 to 6 cells of 1 to 13 trials."""
    rng = random.Random(seed)
    sizes = [rng.randint(1, 13) for _ in range(rng.randint(1, 6))]
    order = interleave(sizes, random.Random(seed))
    assert Counter(order) == dict(enumerate(sizes))
    total, seen = sum(sizes), Counter()
    for position, cell in enumerate(order, start=1):
        seen[cell] += 1
        for c, n in enumerate(sizes):
            assert position * n // total <= seen[c] <= -(-position * n // total)


def test_reproducible_for_a_seed_and_different_across_seeds():
    assert make_plan(TRIALS, 5) == make_plan(TRIALS, 5)
    orders = {tuple(make_plan(TRIALS, seed)) for seed in range(30)}
    assert len(orders) == 30
    sides = {tuple(p.model_side for p in sorted(make_plan(TRIALS, seed), key=lambda p: p.trial))
             for seed in range(30)}
    assert len(sides) > 1                                       # the sides are drawn too


def test_participant_seed_is_stable_and_distinct():
    assert participant_seed("study1", "alice") == participant_seed("study1", "alice")
    seeds = {participant_seed("study1", name) for name in ("alice", "bob", "carol")}
    seeds.add(participant_seed("study2", "alice"))
    assert len(seeds) == 4
    # a fixed value: a returning participant must get the same plan from any later version
    assert participant_seed("s", "p") == int.from_bytes(
        __import__("hashlib").sha256(b"s\x00p").digest()[:8], "big")


def test_one_model_even_cells():
    small = trials(models=("only",), items=4, attention=2)
    plan = make_plan(small, 1)
    sides = Counter(p.model_side for p in plan)
    assert sides["left"] == sides["right"] == len(small) // 2
