"""Request and response bodies of the user and token routes, and ``read_user``: how one user is
shown to another."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import TYPE_CHECKING, Annotated

from pydantic import AnyHttpUrl, EmailStr, Field, field_validator

from flplatform.kit.schemas import RequestSchema, Schema
from flplatform.orm.user import (
    DateFormat,
    DateSeparator,
    DateTimeSeparator,
    DecimalSeparator,
    TimeFormat,
    User,
)

if TYPE_CHECKING:  # permissions imports the auth dependencies, which import users
    from flplatform.permissions import Requester

Username = Annotated[str, Field(min_length=1, max_length=150, pattern=r"^[\w.@+-]+$", examples=["alice"])]
Password = Annotated[str, Field(min_length=8, max_length=256, examples=["correct horse battery"])]
Name = Annotated[str, Field(max_length=140)]


def _blank_to_none(value: object) -> object:
    return None if value == "" else value


class UserPreferences(RequestSchema):
    time_format: TimeFormat | None = None
    date_format: DateFormat | None = None
    date_separator: DateSeparator | None = None
    datetime_separator: DateTimeSeparator | None = None
    decimal_separator: DecimalSeparator | None = None


class UserCreate(RequestSchema):
    username: Username
    password: Password
    email: EmailStr | None = None
    first_name: Name = ""
    last_name: Name = ""
    profile: Annotated[str, Field(max_length=10_000)] = ""
    message_endpoint: AnyHttpUrl | None = Field(
        default=None,
        description="URL that receives training notifications (JSON POSTs). No user info; hosts on "
        "loopback, link-local, multicast or other non-public addresses are refused (422) unless the operator "
        "allowlists them (FLP_NOTIFICATION_ALLOWED_NETWORKS).",
    )
    notify_client_removed: bool = Field(
        default=False,
        description="Also send CLIENT_REMOVED to message_endpoint when removed from a training. Off by "
        "default: the reference platform never sends it and its client answers unknown types with 400.",
    )
    actor: bool = False
    client: bool = False
    is_staff: bool = Field(default=False, description="Only a superuser may set this.")
    is_superuser: bool = Field(default=False, description="Only a superuser may set this.")
    organization_id: uuid.UUID | None = Field(
        default=None,
        description="Superusers: any organisation; organisation admins: their own (the default).",
    )
    time_format: TimeFormat = TimeFormat.H24
    date_format: DateFormat = DateFormat.DMY
    date_separator: DateSeparator = DateSeparator.SLASH
    datetime_separator: DateTimeSeparator = DateTimeSeparator.SPACE
    decimal_separator: DecimalSeparator = DecimalSeparator.COMMA

    _blank_email = field_validator("email", "message_endpoint", mode="before")(_blank_to_none)

    model_config = {
        "json_schema_extra": {
            "examples": [
                {
                    "username": "client-1",
                    "password": "a long secret",
                    "email": "client1@example.org",
                    "message_endpoint": "http://client1.example.org:8101/",
                    "client": True,
                }
            ]
        }
    }


class UserUpdate(RequestSchema):
    """Partial update: only the fields sent change."""

    username: Username | None = None
    password: Password | None = None
    email: EmailStr | None = None
    first_name: Name | None = None
    last_name: Name | None = None
    profile: Annotated[str, Field(max_length=10_000)] | None = None
    message_endpoint: AnyHttpUrl | None = None
    notify_client_removed: bool | None = None
    actor: bool | None = None
    client: bool | None = None
    is_active: bool | None = Field(default=None, description="Superusers only.")
    is_staff: bool | None = Field(default=None, description="Superusers only.")
    is_superuser: bool | None = Field(default=None, description="Superusers only.")
    time_format: TimeFormat | None = None
    date_format: DateFormat | None = None
    date_separator: DateSeparator | None = None
    datetime_separator: DateTimeSeparator | None = None
    decimal_separator: DecimalSeparator | None = None

    _blank_email = field_validator("email", "message_endpoint", mode="before")(_blank_to_none)

    model_config = {"json_schema_extra": {"examples": [{"first_name": "Ada", "message_endpoint": None}]}}


class UserRead(Schema):
    id: uuid.UUID
    username: str
    email: str | None
    first_name: str
    last_name: str
    profile: str
    actor: bool
    client: bool
    message_endpoint: str | None
    notify_client_removed: bool = False
    is_active: bool
    is_staff: bool
    is_superuser: bool
    organization_id: uuid.UUID | None = None
    time_format: TimeFormat
    date_format: DateFormat
    date_separator: DateSeparator
    datetime_separator: DateTimeSeparator
    decimal_separator: DecimalSeparator
    date_joined: dt.datetime = Field(validation_alias="created_at")
    last_login_at: dt.datetime | None
    token: str | None = Field(
        default=None, description="The user's API token: shown on creation and to the user themselves only."
    )


def read_user(user: User, token: str | None = None, *, viewer: Requester | None = None) -> UserRead:
    """A user as ``viewer`` may see them (every route showing users goes through this)."""
    out = UserRead.model_validate(user)
    out.token = token
    if viewer is not None and viewer.is_unorganised and viewer.id != user.id:
        # The organisation-less space lists its users to each other (the DLR clients pick
        # participants by name); contact details stay with their owner.
        out.email = None
        out.message_endpoint = None
    return out


class TokenCreate(RequestSchema):
    name: Annotated[str, Field(min_length=1, max_length=100)] = "api"
    expires_in_days: Annotated[int, Field(ge=1, le=3650)] | None = Field(
        default=90, description="Days until the token expires; null for a token that never expires."
    )


class TokenRead(Schema):
    id: uuid.UUID
    name: str
    prefix: str = Field(description="First characters of the token, to recognise it.")
    is_primary: bool
    created_at: dt.datetime
    expires_at: dt.datetime | None
    revoked_at: dt.datetime | None
    last_used_at: dt.datetime | None


class TokenCreated(TokenRead):
    token: str = Field(description="The token itself. Shown once: store it now.")


class AccessToken(Schema):
    access_token: str
    token_type: str = "bearer"
    expires_in: int
