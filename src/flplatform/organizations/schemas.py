"""Organisations, projects, groups, memberships, roles, invitations and organisation settings."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Annotated, Literal

from pydantic import Field

from flplatform.kit.schemas import RequestSchema, Schema
from flplatform.orm.organizations import CollectionKind, RoleKind
from flplatform.users.schemas import UserCreate

CollectionName = Annotated[str, Field(min_length=1, max_length=200, examples=["Hospital network"])]


class SettingsFields(RequestSchema):
    """Seed 003's FacilityDataset switches; organisation admins are not bound by them."""

    description: Annotated[str, Field(max_length=10_000)] | None = None
    location: Annotated[str, Field(max_length=200)] | None = None
    members_can_edit_username: bool | None = None
    members_can_edit_name: bool | None = Field(default=None, description="First and last name.")
    members_can_edit_password: bool | None = None
    members_can_sign_up: bool | None = Field(default=None, description="Sign up through an invitation link.")
    members_can_delete_account: bool | None = None

    model_config = {
        "json_schema_extra": {"examples": [{"location": "Cologne", "members_can_delete_account": True}]}
    }


class OrganizationSettingsRead(Schema):
    organization_id: uuid.UUID
    description: str
    location: str
    members_can_edit_username: bool
    members_can_edit_name: bool
    members_can_edit_password: bool
    members_can_sign_up: bool
    members_can_delete_account: bool


class OrganizationCreate(SettingsFields):
    name: CollectionName

    model_config = {"json_schema_extra": {"examples": [{"name": "Hospital network", "location": "Berlin"}]}}


class CollectionUpdate(RequestSchema):
    name: CollectionName


class ProjectCreate(RequestSchema):
    name: CollectionName

    model_config = {"json_schema_extra": {"examples": [{"name": "Chest X-ray federation"}]}}


class GroupCreate(RequestSchema):
    """The DLR ``POST /api/groups/`` body plus where to put the group. Without ``project_id`` the
    group goes into the caller's organisation's ``default`` project (made on first use)."""

    name: CollectionName
    project_id: uuid.UUID | None = None
    kind: Literal["group", "adhoc"] = Field(
        default="group", description="`adhoc`: a group made for one training."
    )

    model_config = {"json_schema_extra": {"examples": [{"name": "Radiology clients"}]}}


class ProjectGroupCreate(RequestSchema):
    name: CollectionName
    kind: Literal["group", "adhoc"] = Field(
        default="group", description="`adhoc`: a group made for one training."
    )

    model_config = {"json_schema_extra": {"examples": [{"name": "Site A clients", "kind": "group"}]}}


class CollectionRead(Schema):
    id: uuid.UUID
    name: str
    kind: CollectionKind
    parent_id: uuid.UUID | None
    organization_id: uuid.UUID
    created_at: dt.datetime


class GroupRead(CollectionRead):
    """The DLR group shape (``id``, ``name``) plus the hierarchy. Ids are UUIDs, not the
    reference's integers."""

    project_id: uuid.UUID = Field(validation_alias="parent_id")


class OrganizationRead(CollectionRead):
    settings: OrganizationSettingsRead | None = None


class MemberAdd(RequestSchema):
    user_id: uuid.UUID


class MembershipRead(Schema):
    id: uuid.UUID
    user_id: uuid.UUID
    collection_id: uuid.UUID
    created_at: dt.datetime


class RoleAdd(RequestSchema):
    user_id: uuid.UUID
    kind: RoleKind = Field(description="`admin` (organisations only) or `coach` (any level).")


class RoleRead(Schema):
    id: uuid.UUID
    user_id: uuid.UUID
    collection_id: uuid.UUID
    kind: RoleKind
    created_at: dt.datetime


class Removed(Schema):
    """Whether something was removed (false: there was nothing to remove)."""

    removed: bool


class InvitationCreate(RequestSchema):
    expires_in_hours: Annotated[int, Field(ge=1, le=24 * 365)] = 24 * 7
    max_uses: Annotated[int, Field(ge=1, le=100_000)] | None = Field(
        default=None, description="null: unlimited"
    )
    note: Annotated[str, Field(max_length=200)] = ""


class InvitationRead(Schema):
    id: uuid.UUID
    organization_id: uuid.UUID
    prefix: str = Field(description="First characters of the token, to recognise the link.")
    note: str
    created_by_id: uuid.UUID | None
    created_at: dt.datetime
    expires_at: dt.datetime
    revoked_at: dt.datetime | None
    max_uses: int | None
    uses: int


class InvitationCreated(InvitationRead):
    token: str = Field(description="Shown once. Give it to the invitee (POST /api/invitations/accept/).")


class InvitationAccept(RequestSchema):
    """An authenticated user outside every organisation joins with ``token`` alone; an anonymous
    caller signs up by adding ``user`` (if the organisation allows members to sign up)."""

    token: Annotated[str, Field(min_length=8, max_length=200)]
    user: UserCreate | None = None

    model_config = {
        "json_schema_extra": {
            "examples": [
                {
                    "token": "inv_Xq3v9Tb2Lw8Ke5Rz",
                    "user": {"username": "client-7", "password": "a long secret"},
                }
            ]
        }
    }
