"""SQLAlchemy 2.0 typed models, one module per domain. Importing this package registers every
table on ``Base.metadata`` (Alembic's autogenerate target)."""

from flplatform.orm.audit import AuditLog
from flplatform.orm.base import Base
from flplatform.orm.billing import Hold, JournalEntry, LedgerAccount, Operation, Posting  # noqa: F401
from flplatform.orm.broker import (  # noqa: F401  (registers the broker tables)
    BrokerDelivery,
    BrokerMessage,
    BrokerSubscription,
    BrokerTopic,
    BrokerTopicGrant,
    ResponseTopic,
)
from flplatform.orm.fleet import ClientHeartbeat, RoundSelection, TrainingCollection
from flplatform.orm.metric import Metric
from flplatform.orm.model import (
    GlobalModel,
    GlobalModelRound,
    LocalModel,
    MeanModel,
    Model,
    ModelKind,
    SWAGModel,
    WeightsLayout,
)
from flplatform.orm.organizations import (
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
from flplatform.orm.throttle import RateLimitCounter  # noqa: F401  (registers the throttle table)
from flplatform.orm.training import (
    AggregationMethod,
    Notification,
    NotificationStatus,
    SwagStatistic,
    Training,
    TrainingState,
    UncertaintyMethod,
)
from flplatform.orm.training_event import TrainingEvent, TrainingEventHead
from flplatform.orm.user import ApiToken, LoginName, User
from flplatform.orm.workqueue import (
    QueuedWork,  # noqa: F401  (registers the work-queue table)
    Server,
    Work,
)

__all__ = [
    "AdHocGroup",
    "AggregationMethod",
    "ApiToken",
    "AuditLog",
    "Base",
    "BrokerDelivery",
    "BrokerMessage",
    "BrokerSubscription",
    "BrokerTopic",
    "BrokerTopicGrant",
    "ClientHeartbeat",
    "Collection",
    "CollectionKind",
    "GlobalModel",
    "GlobalModelRound",
    "Group",
    "Hold",
    "Invitation",
    "JournalEntry",
    "LedgerAccount",
    "LocalModel",
    "LoginName",
    "MeanModel",
    "Membership",
    "Metric",
    "Model",
    "ModelKind",
    "Notification",
    "NotificationStatus",
    "Operation",
    "Organization",
    "OrganizationSettings",
    "Posting",
    "Project",
    "QueuedWork",
    "RateLimitCounter",
    "ResponseTopic",
    "Role",
    "RoleKind",
    "RoundSelection",
    "SWAGModel",
    "WeightsLayout",
    "Server",
    "SwagStatistic",
    "Training",
    "TrainingCollection",
    "TrainingEvent",
    "TrainingEventHead",
    "TrainingState",
    "UncertaintyMethod",
    "User",
    "Work",
]
