"""Successive halving: a candidate-epoch budget spent over candidates in rounds that drop the weaker half.

With n candidates the rounds hold n, ⌈n/2⌉, ⌈n/4⌉, …, 1 of them; each round gets an equal share of the budget split
evenly over its candidates (whole epochs, at least one per candidate before a cut), the last round (the survivor
alone) takes whatever is left, so exactly the given budget is spent.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from amas.errors import SelectionError

__all__ = ["halving_schedule", "successive_halving"]


def halving_schedule(n: int, budget: int) -> list[tuple[int, int]]:
    """[(candidates alive, epochs each)] per round of successive halving; Σ alive·epochs == budget exactly."""
    if n < 1:
        raise SelectionError("successive halving needs at least one candidate; check select.levels")
    if budget < 1:
        raise SelectionError(f"select.budget_epochs={budget} must be at least 1")
    counts = [n]
    while counts[-1] > 1:
        counts.append(math.ceil(counts[-1] / 2))
    if len(counts) == 1:
        return [(1, int(budget))]
    need = sum(counts[:-1])
    if budget < need:
        raise SelectionError(
            f"select.budget_epochs={budget} is below the {need} epochs successive halving needs for {n} candidates "
            f"(one epoch each before every cut); raise select.budget_epochs to at least {need} or use fewer "
            f"select.levels"
        )
    share = budget / len(counts)
    epochs = [max(1, int(share // c)) for c in counts[:-1]]
    while (
        sum(c * e for c, e in zip(counts[:-1], epochs, strict=True)) > budget
    ):  # forced minimum of 1 overshot the shares
        r = max(i for i, e in enumerate(epochs) if e > 1)
        epochs[r] -= 1
    epochs.append(budget - sum(c * e for c, e in zip(counts[:-1], epochs, strict=True)))  # the survivor takes the rest
    return list(zip(counts, epochs, strict=True))


def successive_halving(ids: list[int], budget: int, train: Callable[[int, int], float],
                       score: Callable[[int, float], tuple], on_round: Callable[[dict], None] | None = None) -> dict:
    """Spend budget epochs over ids by successive halving.

    train(id, until_epoch) trains candidate id up to epoch until_epoch of its schedule and returns its val acc;
    score(id, acc) is the sort key (higher is better). Returns the rounds, epochs and last accuracy per id,
    the epochs spent (== budget) and the survivor.
    """
    schedule = halving_schedule(len(ids), budget)
    alive = list(ids)
    until = 0
    acc: dict[int, float] = {}
    epochs = {i: 0 for i in ids}
    rounds: list[dict] = []
    spent = 0
    for r, (n, e) in enumerate(schedule):
        assert len(alive) == n, (alive, n)
        until += e
        for cid in alive:
            if e > 0:
                acc[cid] = float(train(cid, until))
                epochs[cid] = until
                spent += e
        ranked = sorted(alive, key=lambda c: score(c, acc.get(c, float("nan"))), reverse=True)
        keep = ranked[: schedule[r + 1][0]] if r + 1 < len(schedule) else ranked
        record = {"round": r + 1, "alive": list(alive), "epochs_each": e, "until_epoch": until,
                  "val_acc": {str(c): acc.get(c) for c in alive}, "kept": keep,
                  "dropped": [c for c in alive if c not in keep]}
        rounds.append(record)
        if on_round is not None:
            on_round(record)
        alive = keep
    return {"schedule": [list(s) for s in schedule], "rounds": rounds, "epochs": epochs, "val_acc": acc,
            "spent": spent, "budget": int(budget), "survivor": alive[0], "horizon": until}
