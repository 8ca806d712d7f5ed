"""Each participant's trial order: balanced, and reproducible from the participant's seed.

Every participant answers every trial of the study. The trials fall into cells, one per
(kind, model, variant): each model in each task variant, and the attention checks of each
variant. The order balances them in two ways:

- over time: the cells take turns so that after any number p of trials, each cell has had
  its share p * n_c / N of them rounded down or up (n_c: the cell's trials, N: all), so no model
  or variant is crowded at the start, where people are fresh, or at the end, where they tire.
  `interleave` does it: a quota apportionment (Balinski and Young) made by earliest deadline
  first, with ties (cells of equal size) drawn at random. Each cell's trials are shuffled;
- left and right: within each cell the model's image is on the left in half the trials and on
  the right in the other half (a cell of odd size has one trial over, whose side alternates
  between such cells), so the whole session is balanced to within one trial.

The plan depends only on the list of trials and the seed; `participant_seed` derives the seed
from the study and the participant's id, so a returning participant gets the same plan.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

SIDES = ("left", "right")


@dataclass(frozen=True)
class PlannedTrial:
    """One trial of a participant's plan: the trial id, and on which side the model's image
    (for an attention check: the blurred image) is shown; the ground truth is on the other."""
    trial: str
    model_side: str


def participant_seed(study_id: str, participant: str) -> int:
    """The seed of a participant's plan: a 64-bit number from the study id and participant id."""
    digest = hashlib.sha256(f"{study_id}\x00{participant}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def cell_of(trial: dict) -> tuple:
    """The balancing cell of a manifest trial: (kind, model, variant)."""
    return trial["kind"], trial["model"], trial["variant"]


def make_plan(trials: list[dict], seed: int) -> list[PlannedTrial]:
    """The order in which a participant sees `trials` (manifest trial dicts) and the side of the
    model's image in each, as described in this module's docstring."""
    rng = random.Random(seed)
    cells: dict[tuple, list[dict]] = {}
    for trial in trials:                       # in manifest order, so the plan is reproducible
        cells.setdefault(cell_of(trial), []).append(trial)

    odd_side = rng.choice(SIDES)               # the side of the next odd cell's extra trial
    queues = []
    for members in cells.values():
        members = list(members)
        rng.shuffle(members)
        sides = [SIDES[0], SIDES[1]] * (len(members) // 2)
        if len(members) % 2:
            sides.append(odd_side)
            odd_side = SIDES[1] if odd_side == SIDES[0] else SIDES[0]
        rng.shuffle(sides)
        queues.append([PlannedTrial(trial["id"], side) for trial, side in zip(members, sides)])
    order = interleave([len(queue) for queue in queues], rng)
    return [queues[cell].pop() for cell in order]


def interleave(sizes: list[int], rng: random.Random) -> list[int]:
    """A sequence of cell indices, cell c appearing sizes[c] times, such that after every p
    positions cell c has appeared floor(p * sizes[c] / N) or ceil(p * sizes[c] / N) times.

    The k-th appearance of cell c may come no earlier than position floor((k - 1) N / n_c) + 1
    (or the count would exceed the ceiling) and no later than ceil(k N / n_c) (or it would fall
    below the floor). Placing, at each position, the released appearance with the earliest
    deadline meets every deadline when any order does, and a quota order always exists."""
    total = sum(sizes)
    placed = [0] * len(sizes)
    order = []
    for position in range(1, total + 1):
        released = [c for c, n in enumerate(sizes) if placed[c] * total < position * n]
        deadline = {c: -(-(placed[c] + 1) * total // sizes[c]) for c in released}
        soonest = min(deadline.values())
        if soonest < position:
            raise AssertionError(f"interleave missed a deadline at position {position}: {sizes}")
        cell = rng.choice([c for c in released if deadline[c] == soonest])
        placed[cell] += 1
        order.append(cell)
    return order
