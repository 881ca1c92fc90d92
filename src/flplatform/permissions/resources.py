"""Policies for the platform's resources: models, trainings, metrics and broker topics.

Every row carries its tenant (``organization_id``: the owner's organisation, None in the
organisation-less DLR-compatible space), so each clause starts with one indexed equality on that
column (Kolibri's ``dataset_id`` filter) and nothing crosses organisations. Inside the tenant:

* **trainings** are read by their actor, their participants and whoever holds a role on the
  whole organisation (admins, organisation coaches); managed by the actor and the organisation's
  admins; created by users with a role in their organisation (admin or coach) for participants
  they hold a role for (checked with ``users_without_role``: one query for all participants).
  In the DLR space every user may create trainings, as in the reference server.
* **models** are read by their owner, by organisation role holders, and by whoever reads the
  training the model backs (a local update: its base model's training — FedDC clients download
  each other's updates); updated by the owner and the organisation's admins; deleted by those and
  the training's actor.
* **metrics** follow the model they were reported on.
* **broker topics** are read (HTTP/JSON views) by the owner, grantees, organisation role holders
  and, when ``is_public``, by every user of the topic's tenant; managed by the owner and the
  organisation's admins. Organisation-less topics keep the reference's rules for every caller.

The clauses are nested ``IN (SELECT …)`` look-ups on indexed columns (``trainings.actor_id``,
``training_participants.user_id``, ``local_models.base_model_id``, ``roles``): the number of
statements of a list does not depend on the number of rows, and no clause recurses.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import and_, bindparam, exists, false, or_, select
from sqlalchemy.orm import InstrumentedAttribute

from flplatform.errors import Forbidden, NotFound
from flplatform.orm.broker import BrokerTopic, BrokerTopicGrant, ResponseTopic
from flplatform.orm.metric import Metric
from flplatform.orm.model import LocalModel, Model
from flplatform.orm.organizations import RoleKind
from flplatform.orm.training import Training, training_participants
from flplatform.permissions.base import Clause, Policy, Superuser
from flplatform.permissions.organizations import has_org_role_clause
from flplatform.permissions.requester import ANY_ROLE, Requester

ADMIN = (RoleKind.ADMIN,)


# ---------------------------------------------------------------------------- tenant helpers


def tenant_clause(requester: Requester, column: InstrumentedAttribute[Any]) -> Clause:
    """Rows of the requester's tenant: their organisation, or the organisation-less space."""
    if requester.in_organization:
        return column == requester.organization_id
    if requester.is_unorganised:
        return column.is_(None)
    return false()


def in_tenant(requester: Requester, organization_id: uuid.UUID | None) -> bool:
    if requester.in_organization:
        return organization_id == requester.organization_id
    return requester.is_unorganised and organization_id is None


def oversees_clause(requester: Requester) -> Clause:
    """A role on the requester's whole organisation (admin or organisation coach): reads everything
    in it. An uncorrelated EXISTS, evaluated once per statement."""
    return has_org_role_clause(requester, ANY_ROLE) if requester.in_organization else false()


def oversees(requester: Requester) -> bool:
    return requester.in_organization and requester.has_org_role(ANY_ROLE)


def administers(requester: Requester, organization_id: uuid.UUID | None) -> bool:
    return (
        requester.in_organization and organization_id == requester.organization_id and requester.is_org_admin
    )


def participations(requester: Requester) -> Any:
    """``SELECT training_id FROM training_participants WHERE user_id = :me``."""
    return select(training_participants.c.training_id).where(training_participants.c.user_id == requester.id)


def my_training_models(requester: Requester) -> Any:
    """Global model ids of the trainings the requester acts in or participates in."""
    return select(Training.model_id).where(
        or_(Training.actor_id == requester.id, Training.id.in_(participations(requester)))
    )


# Built once: a participant's every request on its training's models (each update) asks it.
_TAKES_PART = select(
    Training.actor_id == bindparam("user_id"),
    exists(
        select(training_participants.c.user_id).where(
            training_participants.c.training_id == Training.id,
            training_participants.c.user_id == bindparam("user_id"),
        )
    ),
).where(Training.model_id == bindparam("model_id"))


async def _takes_part(requester: Requester, global_model_id: uuid.UUID) -> tuple[bool, bool]:
    """(acts, participates) in the training backed by ``global_model_id`` — one indexed query."""
    row = (
        await requester.session.execute(_TAKES_PART, {"user_id": requester.id, "model_id": global_model_id})
    ).first()
    return (bool(row[0]), bool(row[1])) if row is not None else (False, False)


def global_model_id(model: Model) -> uuid.UUID:
    return model.base_model_id if isinstance(model, LocalModel) else model.id


# ---------------------------------------------------------------------------- trainings


class TrainingRules(Policy):
    """See the module docstring. ``can_read`` asks the participation table whether the requester
    takes part (one indexed EXISTS), never the training's loaded participant list."""

    model = Training

    async def can_read(self, requester: Requester, obj: Training) -> bool:
        if not in_tenant(requester, obj.organization_id):
            return False
        if obj.actor_id == requester.id or oversees(requester):
            return True
        if requester.id is None:
            return False
        found = await requester.session.execute(
            select(
                exists().where(
                    training_participants.c.training_id == obj.id,
                    training_participants.c.user_id == requester.id,
                )
            )
        )
        return bool(found.scalar())

    def readable(self, requester: Requester) -> Clause:
        if requester.is_anonymous:
            return false()
        return and_(
            tenant_clause(requester, Training.organization_id),
            or_(
                Training.actor_id == requester.id,
                Training.id.in_(participations(requester)),
                oversees_clause(requester),
            ),
        )

    async def can_create(self, requester: Requester, obj: Training) -> bool:
        """The actor's side; every participant is checked with ``users_without_role`` too."""
        if requester.is_unorganised:
            return obj.organization_id is None
        return in_tenant(requester, obj.organization_id) and bool(requester.roles)

    async def can_update(self, requester: Requester, obj: Training) -> bool:
        return in_tenant(requester, obj.organization_id) and (
            obj.actor_id == requester.id or administers(requester, obj.organization_id)
        )

    can_delete = can_update


# ---------------------------------------------------------------------------- models


class ModelRules(Policy):
    model = Model

    async def can_read(self, requester: Requester, obj: Model) -> bool:
        if not in_tenant(requester, obj.organization_id):
            return False
        if obj.owner_id == requester.id or oversees(requester):
            return True
        acts, participates = await _takes_part(requester, global_model_id(obj))
        return acts or participates

    def readable(self, requester: Requester) -> Clause:
        if requester.is_anonymous:
            return false()
        mine = my_training_models(requester)
        return and_(
            tenant_clause(requester, Model.organization_id),
            or_(
                Model.owner_id == requester.id,
                oversees_clause(requester),
                Model.id.in_(mine),
                # Uncorrelated on purpose: the outer query may itself select LocalModel.
                Model.id.in_(select(LocalModel.id).where(LocalModel.base_model_id.in_(mine)).correlate(None)),
            ),
        )

    async def can_create(self, requester: Requester, obj: Model) -> bool:
        return in_tenant(requester, obj.organization_id) and obj.owner_id == requester.id

    async def can_update(self, requester: Requester, obj: Model) -> bool:
        return in_tenant(requester, obj.organization_id) and (
            obj.owner_id == requester.id or administers(requester, obj.organization_id)
        )

    async def can_delete(self, requester: Requester, obj: Model) -> bool:
        if await self.can_update(requester, obj):
            return True
        if not in_tenant(requester, obj.organization_id):
            return False
        acts, _ = await _takes_part(requester, global_model_id(obj))
        return acts


# ---------------------------------------------------------------------------- metrics


class MetricRules(Policy):
    """A metric is visible exactly when its model is (the model's rules decide)."""

    model = Metric

    async def can_read(self, requester: Requester, obj: Metric) -> bool:
        model = await requester.session.get(Model, obj.model_id)
        return model is not None and await ModelRules().can_read(requester, model)

    def readable(self, requester: Requester) -> Clause:
        if requester.is_anonymous:
            return false()
        return Metric.model_id.in_(select(Model.id).where(ModelRules().readable(requester)))


# ---------------------------------------------------------------------------- broker topics


class TopicRules(Policy):
    """HTTP/JSON visibility and management of broker topics (the websocket protocol's produce/
    consume rights stay with ``flplatform.broker.permissions``, whose grants are refused across
    organisations)."""

    model = BrokerTopic

    @staticmethod
    def _scope(requester: Requester, organization_id: uuid.UUID | None) -> bool:
        """Organisation-less topics are in everyone's scope (the reference's rules apply);
        an organisation's topics only in its users'."""
        return organization_id is None or (
            requester.in_organization and organization_id == requester.organization_id
        )

    def _scope_clause(self, requester: Requester) -> Clause:
        if requester.in_organization:
            return or_(
                BrokerTopic.organization_id.is_(None),
                BrokerTopic.organization_id == requester.organization_id,
            )
        return BrokerTopic.organization_id.is_(None)

    async def can_read(self, requester: Requester, obj: BrokerTopic) -> bool:
        if requester.is_anonymous or not self._scope(requester, obj.organization_id):
            return False
        if (
            obj.is_public
            or obj.owner_id == requester.id
            or (oversees(requester) and obj.organization_id is not None)
        ):
            return True
        if isinstance(obj, ResponseTopic) and obj.requester_id == requester.id:
            return True
        grant = await requester.session.get(BrokerTopicGrant, (obj.id, requester.id))
        return grant is not None

    def readable(self, requester: Requester) -> Clause:
        if requester.is_anonymous:
            return false()
        granted = select(BrokerTopicGrant.topic_id).where(BrokerTopicGrant.user_id == requester.id)
        requested = select(ResponseTopic.id).where(ResponseTopic.requester_id == requester.id)
        org_topics = (
            and_(BrokerTopic.organization_id.is_not(None), oversees_clause(requester))
            if requester.in_organization
            else false()
        )
        return and_(
            self._scope_clause(requester),
            or_(
                BrokerTopic.is_public.is_(True),
                BrokerTopic.owner_id == requester.id,
                BrokerTopic.id.in_(granted),
                BrokerTopic.id.in_(requested),
                org_topics,
            ),
        )

    async def can_create(self, requester: Requester, obj: BrokerTopic) -> bool:
        return not requester.is_anonymous

    async def can_update(self, requester: Requester, obj: BrokerTopic) -> bool:
        if requester.is_anonymous or not self._scope(requester, obj.organization_id):
            return False
        return (obj.owner_id is not None and obj.owner_id == requester.id) or administers(
            requester, obj.organization_id
        )

    can_delete = can_update


TRAINING_POLICY = Superuser() | TrainingRules()
MODEL_POLICY = Superuser() | ModelRules()
METRIC_POLICY = Superuser() | MetricRules()
TOPIC_POLICY = Superuser() | TopicRules()


# ---------------------------------------------------------------------------- refusals


def refusal(
    requester: Requester, organization_id: uuid.UUID | None, label: str, dlr_message: str
) -> Exception:
    """What to raise when the caller may not see an object: 404 (existence is not revealed), except
    between two users of the organisation-less DLR space, where the reference server's 403 (and its
    message) is kept because DLR clients rely on it."""
    if requester.is_unorganised and organization_id is None:
        return Forbidden(dlr_message)
    return NotFound(f"{label} not found.")


__all__ = [
    "METRIC_POLICY",
    "MODEL_POLICY",
    "TOPIC_POLICY",
    "TRAINING_POLICY",
    "administers",
    "global_model_id",
    "in_tenant",
    "my_training_models",
    "oversees",
    "oversees_clause",
    "participations",
    "refusal",
    "tenant_clause",
]
