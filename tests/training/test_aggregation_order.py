"""A round's updates are folded in an order that is the same in every run: float sums depend on the
order, and neither arrival times nor the (random) user ids may decide it, or a seeded
`flplatform demo` gives different accuracies from run to run (issue 20: seed 0 gave
0.8914/0.9387 and 0.8886/0.9471 in rounds 4-5 of two runs)."""

from __future__ import annotations

import uuid

import torch

from flplatform.orm import User
from flplatform.trainings.phases import name_order


def _users(users: list[tuple[int, str]]) -> list[User]:
    return [User(id=uuid.UUID(int=i), username=name) for i, name in users]


def test_participants_are_ordered_by_username_whatever_their_ids():
    """``phases.participant_order`` reads the senders' usernames and sorts with ``name_order``."""
    first_run = _users([(3, "client-1"), (1, "client-2"), (2, "client-3")])
    second_run = _users([(2, "client-1"), (3, "client-2"), (1, "client-3")])
    for users in (first_run, second_run):
        names = {u.id: u.username for u in users}
        arrived = [u.id for u in reversed(users)]  # any arrival order
        ordered = sorted(arrived, key=name_order(names))
        assert [names[i] for i in ordered] == ["client-1", "client-2", "client-3"]


def test_why_the_order_matters_float_sums_are_not_associative():
    big, one = torch.tensor(1e8, dtype=torch.float32), torch.tensor(1.0, dtype=torch.float32)
    assert (big + one) - big != (big - big) + one
