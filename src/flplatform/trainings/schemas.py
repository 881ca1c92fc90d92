"""Training request/response schemas, the validated ``options`` and notification payloads."""

from __future__ import annotations

import datetime as dt
import uuid
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, field_validator, model_validator

from flplatform.aggregation import AGGREGATOR_NAMES
from flplatform.inference.schemas import UncertaintyOptions
from flplatform.kit.schemas import RequestSchema, Schema
from flplatform.orm.training import AggregationMethod, TrainingState, UncertaintyMethod

# Built from the aggregation package's registry (a dynamic enum, which mypy cannot follow).
AggregatorName = StrEnum("AggregatorName", {n: n for n in AGGREGATOR_NAMES})  # type: ignore[misc]
"""OpenAPI enum of the server-side aggregation rules (``options.aggregator``)."""


class StragglerPolicy(StrEnum):
    IGNORE = "ignore"
    REMOVE = "remove"


class DPOptions(RequestSchema):
    """Server-side differential privacy of the aggregate (Gaussian mechanism on clipped updates)."""

    clip_norm: Annotated[float, Field(gt=0)] = 1.0
    noise_multiplier: Annotated[float, Field(ge=0)] = 0.0
    seed: int | None = None


class StalenessKind(StrEnum):
    CONSTANT = "constant"
    POLYNOMIAL = "polynomial"
    HINGE = "hinge"


class FedBuffOptions(RequestSchema):
    """Asynchronous rounds (``mode: async``): FedBuff (Nguyen et al. 2022). The server folds the
    first ``buffer_size`` updates that arrive into a new global version,
    ``x + server_lr · Σ α(s)·n·(w − x_base) / Σ n``, where ``s`` is how many versions old the
    update's base is (docs/training.md, "Asynchronous rounds")."""

    buffer_size: Annotated[int, Field(ge=1, le=100_000, description="K: updates per new global version.")] = 2
    server_lr: Annotated[float, Field(gt=0, le=1_000, description="η: server learning rate.")] = 1.0
    staleness: StalenessKind = Field(
        default=StalenessKind.POLYNOMIAL,
        description="Staleness weight α(s): `constant` 1, `polynomial` (1+s)^-a (a = 0.5: 1/sqrt(1+s)), "
        "`hinge` 1 up to s = b, then 1/(a(s−b)+1).",
    )
    staleness_exponent: Annotated[float, Field(ge=0, le=100, description="a of `polynomial`.")] = 0.5
    hinge_a: Annotated[float, Field(ge=0, le=1e6, description="a of `hinge`.")] = 10.0
    hinge_b: Annotated[int, Field(ge=0, le=100_000, description="b of `hinge`.")] = 4
    max_staleness: Annotated[
        int | None,
        Field(
            ge=0,
            le=100_000,
            description="Refuse updates more than this many versions old (null: any kept one).",
        ),
    ] = None
    weight_by_samples: bool = Field(
        default=True, description="Weigh updates by sample size (false: each counts 1, the paper's 1/K)."
    )


class TrainingOptions(RequestSchema):
    """Round options. Unknown keys are refused (422)."""

    mode: Literal["sync", "async"] = Field(
        default="sync",
        description="`sync`: rounds wait for every participant (or the deadline). `async`: buffered "
        "asynchronous rounds (FedBuff, options in `fedbuff`); no test rounds; target_num_updates counts "
        "global versions.",
    )
    fedbuff: FedBuffOptions | None = Field(
        default=None, description="Asynchronous rounds' options (mode `async`; defaults when null)."
    )

    daisy_chain_period: Annotated[
        int,
        Field(
            ge=0,
            description="FedDC: redistribute the local models every d rounds (0 = off). "
            "On creation target_num_updates is multiplied by d (the reference's rule).",
        ),
    ] = 0
    aggregation_period: Annotated[
        int | None,
        Field(
            ge=1,
            description="FedDC: aggregate every b rounds (default 2·d); the last round always aggregates.",
        ),
    ] = None
    mu: Annotated[float | None, Field(ge=0, description="FedProx proximal term, sent to clients.")] = None
    round_deadline_seconds: Annotated[
        float | None,
        Field(
            gt=0,
            description="Seconds a round (update, test or SWAG phase) may take; then the straggler rule applies.",
        ),
    ] = None
    min_quorum: Annotated[
        int | None,
        Field(
            ge=1,
            description="After the deadline, aggregate if at least this many updates arrived (default: all).",
        ),
    ] = None
    straggler_policy: StragglerPolicy = Field(
        default=StragglerPolicy.IGNORE,
        description="After a deadline aggregation: `ignore` keeps late clients, `remove` removes them (CLIENT_REMOVED).",
    )
    skip_model_tests: bool = Field(
        default=False, description="Skip the MODEL_TEST_ROUND after each aggregation."
    )
    seed: int | None = Field(
        default=None,
        description="FedDC: seed of the redistribution of the local models (default: from the training id).",
    )
    uncertainty: UncertaintyOptions = Field(default_factory=UncertaintyOptions)
    aggregator: AggregatorName = Field(
        default=AggregatorName("fedavg"),
        description="Server-side aggregation rule (FedAvg/FedProx/FedDC aggregate with it).",
    )
    aggregator_options: dict[str, Any] = Field(
        default_factory=dict, description="Keyword options of the aggregator (e.g. trim ratio)."
    )
    dp: DPOptions | None = Field(default=None, description="Differential privacy of the aggregate.")
    epochs: Annotated[
        int | None,
        Field(
            ge=1,
            le=10_000,
            description="Local epochs per round the clients run (seed: count_of_training_epoch); "
            "billing charges `training_sample_epoch` × samples × epochs (default 1).",
        ),
    ] = None
    clients_per_round: Annotated[
        int | float | None,
        Field(
            description="Clients asked per round (Flower's fraction_train): a count (integer >= 1) or a "
            "fraction of the participants in (0, 1] (rounded up); null: every participant. The draw is "
            "seeded (`seed`, else the training id) and recorded (GET /api/trainings/{id}/rounds/).",
            examples=[10, 0.1],
        ),
    ] = None
    min_clients_per_round: Annotated[
        int,
        Field(ge=1, description="With clients_per_round: ask at least this many (all if fewer participate)."),
    ] = 1
    prefer_online_clients: bool = Field(
        default=False,
        description="With clients_per_round: draw online clients first, then those never heard from, "
        "then offline ones (heartbeats: POST /api/trainings/{id}/heartbeat/ or broker pongs).",
    )
    collections_each_round: bool = Field(
        default=False,
        description="Resolve the training's collections again at every round start (members who joined "
        "take part from the next round); otherwise only when the training starts.",
    )
    billing_samples_per_update: Annotated[
        int | None,
        Field(
            ge=0,
            le=2**31 - 1,
            description="Samples per participant update to reserve when a round starts "
            "(default: the price list's `training_reserve_samples`); the sample-priced part of a round is "
            "billed up to this reservation.",
        ),
    ] = None

    @field_validator("clients_per_round")
    @classmethod
    def _count_or_fraction(cls, value: int | float | None) -> int | float | None:
        if value is None:
            return None
        if isinstance(value, float):
            if not 0 < value <= 1:
                raise ValueError(
                    "a fraction of the participants must be in (0, 1]; give a count as an integer"
                )
            return value
        if value < 1:
            raise ValueError("a count of clients must be >= 1")
        return value


class TrainingCreate(RequestSchema):
    model_id: uuid.UUID
    target_num_updates: Annotated[int, Field(ge=1, le=100_000, description="Number of aggregation rounds.")]
    metric_names: list[Annotated[str, Field(max_length=128)]] = Field(default_factory=list)
    aggregation_method: AggregationMethod
    uncertainty_method: UncertaintyMethod = UncertaintyMethod.NONE
    options: TrainingOptions = Field(default_factory=TrainingOptions)
    clients: list[uuid.UUID] = Field(default_factory=list, description="Initial participants (user ids).")
    collections: list[uuid.UUID] = Field(
        default_factory=list,
        max_length=100,
        description="Projects, groups or ad-hoc groups whose members take part: resolved when the training "
        "starts (and with options.collections_each_round at every round start), with the participant rules "
        "of `clients` (a role for every member).",
    )

    @model_validator(mode="after")
    def _feddc_needs_period(self) -> TrainingCreate:
        if self.aggregation_method == AggregationMethod.FED_DC and self.options.daisy_chain_period < 1:
            raise ValueError("FedDC needs options.daisy_chain_period >= 1")
        return self

    @model_validator(mode="after")
    def _async_rounds(self) -> TrainingCreate:
        options = self.options
        if options.mode != "async":
            if options.fedbuff is not None:
                raise ValueError("options.fedbuff needs options.mode 'async'")
            return self
        if self.aggregation_method == AggregationMethod.FED_DC or options.daisy_chain_period:
            raise ValueError("asynchronous rounds (mode 'async') do not daisy-chain (FedDC)")
        if self.uncertainty_method == UncertaintyMethod.SWAG:
            raise ValueError("asynchronous rounds (mode 'async') have no SWAG round")
        if options.aggregator.value not in ("fedavg", "fedprox") or options.aggregator_options or options.dp:
            raise ValueError(
                "asynchronous rounds fold with FedBuff: options.aggregator must stay fedavg (or fedprox), "
                "without aggregator_options or dp"
            )
        if options.fedbuff is None:
            options.fedbuff = FedBuffOptions()
        return self

    model_config = {
        "json_schema_extra": {
            "examples": [
                {
                    "model_id": "5f0c5b6e-2c1a-4c8e-9d57-1b0f3f0b6a11",
                    "target_num_updates": 3,
                    "metric_names": ["accuracy", "loss"],
                    "aggregation_method": "FedAvg",
                    "uncertainty_method": "NONE",
                    "options": {"round_deadline_seconds": 600, "min_quorum": 2},
                    "clients": [],
                }
            ]
        }
    }


class ClientList(RequestSchema):
    clients: list[uuid.UUID] = Field(min_length=1)

    model_config = {
        "json_schema_extra": {"examples": [{"clients": ["7b1e2c7a-0a43-4e63-9e36-0f3c1f4e9a20"]}]}
    }


class TrainingCreated(Schema):
    detail: str = "Training created successfully!"
    training_id: uuid.UUID


class TrainingRead(Schema):
    id: uuid.UUID
    model: uuid.UUID = Field(validation_alias=AliasChoices("model_id", "model"))
    actor: uuid.UUID = Field(validation_alias=AliasChoices("actor_id", "actor"))
    participants: list[uuid.UUID] = Field(default_factory=list)

    @field_validator("participants", mode="before")
    @classmethod
    def _ids(cls, value: Any) -> Any:
        return [getattr(v, "id", v) for v in value or []]

    state: TrainingState = Field(description="I initial, O ongoing, C completed, E error, S SWAG round.")
    target_num_updates: int
    last_update: dt.datetime
    uncertainty_method: UncertaintyMethod
    aggregation_method: AggregationMethod
    options: dict[str, Any]
    locked: bool
    error_reason: str | None = None
    metric_names: list[str] = Field(default_factory=list)
    phase: str = Field(description="What the round waits for: update, test, swag (or done).")
    round: int | None = Field(default=None, description="The global model's current round.")
    start_round: int
    mu: float | None = Field(default=None, description="FedProx μ (also in options).")
    created_at: dt.datetime
    collections: list[uuid.UUID] = Field(
        default_factory=list,
        description="Collections whose members take part (see `collections` on creation).",
    )
    selection_round: int | None = Field(
        default=None, description="The round whose recorded client selection the current phase waits for."
    )


class ParticipantStatus(Schema):
    """One participant: liveness and whether the current round asked it."""

    id: uuid.UUID
    username: str
    liveness: Literal["online", "offline", "unknown"] = Field(
        description="online: heard from within FLP_CLIENT_OFFLINE_AFTER_SECONDS; offline: earlier; "
        "unknown: never (no heartbeat, no broker pong)."
    )
    last_seen: dt.datetime | None = Field(description="Last heartbeat or broker pong (UTC).")
    selected: bool = Field(description="Selected for the current round and not dropped from it.")


class TrainingDetail(TrainingRead):
    local_models_arrived: int = Field(
        description="Distinct participants that uploaded an update for THIS round."
    )
    local_models_expected: int = Field(
        description="Participants the current round waits for (the selected ones; all without sampling)."
    )
    phase_deadline: dt.datetime | None = None
    participant_status: list[ParticipantStatus] = Field(
        default_factory=list, description="Every participant's liveness and selection, by username."
    )


class DroppedClient(Schema):
    participant: uuid.UUID
    at: dt.datetime
    reason: str | None = None


class RoundSelectionRead(Schema):
    """Which clients a round asked, which answered (sent an update for it), which were dropped."""

    round: int
    selected: list[uuid.UUID]
    answered: list[uuid.UUID]
    dropped: list[DroppedClient] = Field(default_factory=list)


class HeartbeatRead(Schema):
    """The answer to a participant's heartbeat: what the training expects of it now."""

    training_id: uuid.UUID
    participant: uuid.UUID
    last_seen: dt.datetime
    state: TrainingState
    phase: str
    round: int = Field(description="The global model's current round.")
    selected: bool = Field(description="Whether the current round waits for this client.")


NotificationType = Literal[
    "TRAINING_START",
    "UPDATE_ROUND_START",
    "MODEL_TEST_ROUND",
    "SWAG_ROUND_START",
    "TRAINING_FINISHED",
    "CLIENT_REMOVED",
]


class NotificationKey(Schema):
    key: str = Field(description="Hex HMAC key for verifying notifications sent to you.")
    algorithm: str = "HMAC-SHA256"
    signature_header: str = "X-FLP-Signature"
    timestamp_header: str = "X-FLP-Timestamp"
    signed_content: str = "f'{timestamp}.'.encode() + raw request body"


class StopRequest(RequestSchema):
    reason: Annotated[str, Field(max_length=500, pattern="^[^\x00]*$")] = "Stopped by the actor."


class TrainingEventRead(Schema):
    """One training event: the JSON ``data`` of a Server-Sent Event whose ``event:`` is ``kind``
    and whose ``id:`` is ``seq``."""

    seq: int | None = Field(
        description="The event's number in its training (1, 2, 3, ...; the SSE id). None for `gap`."
    )
    kind: str = Field(
        description="round_started, update_received, swag_statistics_received, aggregation_started, "
        "aggregation_finished, test_round_started, test_metrics_received, state_changed, "
        "participant_removed, error; `gap` when events the subscriber missed were pruned"
    )
    training_id: uuid.UUID
    at: dt.datetime | None = Field(description="When the event was recorded (UTC)")
    data: dict[str, Any] = Field(description="The kind's fields (see docs/training.md)")


class MetricSource(StrEnum):
    UPDATE = "update"
    TEST = "test"


class MetricPoint(Schema):
    """One point of a metric series: a participant's value (``reporter`` set) or the round's
    aggregate of one source (``reporter`` null, with ``count`` and ``weighted``)."""

    round: int = Field(
        description="The round: of the update (`update`), of the global model tested (`test`)."
    )
    value: float
    reporter: uuid.UUID | None = Field(default=None, description="The participant; null on the aggregate.")
    source: MetricSource = Field(
        description="`update`: sent with the participant's update; `test`: reported on the global model."
    )
    sample_size: int | None = Field(
        default=None, description="The update's sample size; on an aggregate the weights' total."
    )
    count: int | None = Field(default=None, description="Aggregate only: the points it averages.")
    weighted: bool | None = Field(
        default=None, description="Aggregate only: weighted by sample size (else the plain mean)."
    )


METRIC_SERIES_EXAMPLE: dict[str, Any] = {
    "accuracy": [
        {"round": 1, "value": 0.8, "reporter": None, "source": "test", "count": 2, "weighted": False},
        {"round": 1, "value": 0.75, "reporter": "0b5e4c1e-2c1a-4d55-9c55-3b0f2f6b9a01", "source": "test"},
        {"round": 1, "value": 0.85, "reporter": "7c2d1f0a-9e4b-4f3c-8a6d-5e1b2c3d4f50", "source": "test"},
    ],
    "loss": [
        {
            "round": 0,
            "value": 0.625,
            "reporter": None,
            "source": "update",
            "sample_size": 40,
            "count": 2,
            "weighted": True,
        },
        {
            "round": 0,
            "value": 0.5,
            "reporter": "0b5e4c1e-2c1a-4d55-9c55-3b0f2f6b9a01",
            "source": "update",
            "sample_size": 30,
        },
        {
            "round": 0,
            "value": 1.0,
            "reporter": "7c2d1f0a-9e4b-4f3c-8a6d-5e1b2c3d4f50",
            "source": "update",
            "sample_size": 10,
        },
    ],
}
