"""The work queue's tables as Core ``Table`` objects, for the statements that address the table
of one class of the ``Work``/``QueuedWork`` joined inheritance directly (an ORM ``update`` or
``insert`` on ``QueuedWork`` would touch both tables)."""

from __future__ import annotations

from sqlalchemy import Table

from flplatform.orm.base import Base
from flplatform.orm.workqueue import QueuedWork, Work


def _table(entity: type[Base]) -> Table:
    table = entity.__table__
    assert isinstance(table, Table)  # declarative classes map a Table (typed as FromClause)
    return table


WORK = _table(Work)
QUEUED_WORK = _table(QueuedWork)
