"""A round's updates are folded in an order that is the same in every run: float sums depend on the
order, and neither arrival times nor the (random) user ids may decide it, or a seeded
`flplatform demo` gives different accuracies from run to run (issue 20: seed 0 gave
0.8914/0.9387 and 0.8886/0.9471 in rounds 4-5 of two runs)."""

from __future__ import annotations

import uuid

import torch

from flplatform.orm import Training, User
from flplatform.trainings.phases import participant_order


def _training(users: list[tuple[int, str]]) -> Training:
    training = Training()
    training.participants = [User(id=uuid.UUID(int=i), username=name) for i, name in users]
    return training


def test_participants_are_ordered_by_username_whatever_their_ids():
    first_run = _training([(3, "client-1"), (1, "client-2"), (2, "client-3")])
    second_run = _training([(2, "client-1"), (3, "client-2"), (1, "client-3")])
    for training in (first_run, second_run):
        names = {u.id: u.username for u in training.participants}
        arrived = [u.id for u in reversed(training.participants)]  # any arrival order
        ordered = sorted(arrived, key=participant_order(training))
        assert [names[i] for i in ordered] == ["client-1", "client-2", "client-3"]


def test_why_the_order_matters_float_sums_are_not_associative():
    big, one = torch.tensor(1e8, dtype=torch.float32), torch.tensor(1.0, dtype=torch.float32)
    assert (big + one) - big != (big - big) + one
