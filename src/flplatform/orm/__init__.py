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
from flplatform.orm.model import GlobalModel, GlobalModelRound, LocalModel, MeanModel, Model, ModelKind, SWAGModel
from flplatform.orm.training import (
    AggregationMethod,
    Notification,
    NotificationStatus,
    SwagStatistic,
    Training,
    TrainingState,
    UncertaintyMethod,
)
from flplatform.orm.throttle import RateLimitCounter  # noqa: F401  (registers the throttle table)
from flplatform.orm.user import ApiToken, LoginName, User
from flplatform.orm.workqueue import QueuedWork  # noqa: F401  (registers the work-queue table)

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
    "GlobalModelRound",
    "LocalModel",
    "MeanModel",
    "Metric",
    "Model",
    "Notification",
    "NotificationStatus",
    "ModelKind",
    "SWAGModel",
    "SwagStatistic",
    "Training",
    "TrainingState",
    "UncertaintyMethod",
    "LoginName",
    "User",
]
