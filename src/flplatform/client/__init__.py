"""flplatform's participant SDK: log in, receive notifications (HTTP endpoint or polling),
download the global model, train with your own function, upload the update, report test metrics.

```python
async with FLPlatformAPI(url, token=token) as api, NotificationEndpoint(port=8101) as endpoint:
    me = Participant(api, train=my_train, test=my_test, name="client-1")
    # The SDK handles CLIENT_REMOVED, so it asks for it (reference clients do not).
    await api.update_myself(message_endpoint=endpoint.add(me), notify_client_removed=True)
    ...  # the server now drives the rounds; await me.wait_finished(training_id)
```
"""

from flplatform.client.api import APIError, FLPlatformAPI
from flplatform.client.endpoint import NotificationEndpoint, verify_signature
from flplatform.client.events import TrainingEvent
from flplatform.client.fedprox import proximal_term
from flplatform.client.participant import Participant, RoundContext, RoundRecord, TrainingRun
from flplatform.client.serialization import (
    dump_module,
    dump_state_dict,
    load_module,
    load_state_dict,
    snapshot,
)

__all__ = [
    "APIError",
    "FLPlatformAPI",
    "NotificationEndpoint",
    "Participant",
    "RoundContext",
    "RoundRecord",
    "TrainingEvent",
    "TrainingRun",
    "dump_module",
    "dump_state_dict",
    "load_module",
    "load_state_dict",
    "proximal_term",
    "snapshot",
    "verify_signature",
]
