"""SQLAlchemy 2.0 typed models, one module per domain. Importing this package registers every
table on ``Base.metadata`` (Alembic's autogenerate target)."""

from flplatform.orm.base import Base
from flplatform.orm.collections import (
    AdHocGroup,
    Collection,
    CollectionKind,
    Group,
    Invitation,
    Membership,
    Organization,
    OrganizationSettings,
    Project,
    Role,
    RoleKind,
)
from flplatform.orm.broker import (  # noqa: F401  (registers the broker tables)
    BrokerDelivery,
    BrokerMessage,
    BrokerSubscription,
    BrokerTopic,
    BrokerTopicGrant,
    ResponseTopic,
)
from flplatform.orm.billing import AuditLog, Hold, JournalEntry, LedgerAccount, Operation, Posting, Server, Work  # noqa: F401
from flplatform.orm.metric import Metric
from flplatform.orm.model import GlobalModel, LocalModel, MeanModel, Model, ModelKind, SWAGModel
from flplatform.orm.training import AggregationMethod, Training, TrainingState, UncertaintyMethod
from flplatform.orm.user import ApiToken, User

__all__ = [
    "AdHocGroup",
    "Collection",
    "CollectionKind",
    "Group",
    "Invitation",
    "Membership",
    "Organization",
    "OrganizationSettings",
    "Project",
    "Role",
    "RoleKind",
    "AggregationMethod",
    "ApiToken",
    "Base",
    "GlobalModel",
    "LocalModel",
    "MeanModel",
    "Metric",
    "Model",
    "ModelKind",
    "SWAGModel",
    "Training",
    "TrainingState",
    "UncertaintyMethod",
    "User",
]
