"""Users (email or username login, seed 004 preferences, seed 000 actor/client flags) and API tokens."""

from __future__ import annotations

import datetime as dt
import enum
import uuid

from sqlalchemy import Boolean, ForeignKey, Index, String, Text, false
from sqlalchemy.orm import Mapped, mapped_column, relationship

from flplatform.orm.base import Base, IDMixin, TimestampMixin, str_enum


class TimeFormat(enum.StrEnum):
    H12 = "12H"
    H24 = "24H"


class DateFormat(enum.StrEnum):
    DMY = "DMY"
    MDY = "MDY"


class DateSeparator(enum.StrEnum):
    SLASH = "/"
    DASH = "-"
    DOT = "."


class DateTimeSeparator(enum.StrEnum):
    SPACE = " "
    T = "T"


class DecimalSeparator(enum.StrEnum):
    COMMA = ","
    DOT = "."


class User(IDMixin, TimestampMixin, Base):
    __tablename__ = "users"

    username: Mapped[str] = mapped_column(String(150), unique=True)
    email: Mapped[str | None] = mapped_column(String(254), unique=True)
    password_hash: Mapped[str | None] = mapped_column(String(255))
    first_name: Mapped[str] = mapped_column(String(140), default="")
    last_name: Mapped[str] = mapped_column(String(140), default="")
    profile: Mapped[str] = mapped_column(Text, default="")

    is_active: Mapped[bool] = mapped_column(Boolean, default=True)
    is_staff: Mapped[bool] = mapped_column(Boolean, default=False)
    is_superuser: Mapped[bool] = mapped_column(Boolean, default=False)

    # DLR FL platform: informational roles and the URL receiving training notifications.
    actor: Mapped[bool] = mapped_column(Boolean, default=False)
    client: Mapped[bool] = mapped_column(Boolean, default=False)
    message_endpoint: Mapped[str | None] = mapped_column(String(2048))
    # Opt-in: clients written for the reference platform answer CLIENT_REMOVED (a type the
    # reference never sends) with 400, so only clients that handle it get it.
    notify_client_removed: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())

    time_format: Mapped[TimeFormat] = mapped_column(
        str_enum(TimeFormat, "time_format"), default=TimeFormat.H24
    )
    date_format: Mapped[DateFormat] = mapped_column(
        str_enum(DateFormat, "date_format"), default=DateFormat.DMY
    )
    date_separator: Mapped[DateSeparator] = mapped_column(
        str_enum(DateSeparator, "date_separator"), default=DateSeparator.SLASH
    )
    datetime_separator: Mapped[DateTimeSeparator] = mapped_column(
        str_enum(DateTimeSeparator, "datetime_separator"), default=DateTimeSeparator.SPACE
    )
    decimal_separator: Mapped[DecimalSeparator] = mapped_column(
        str_enum(DecimalSeparator, "decimal_separator"), default=DecimalSeparator.COMMA
    )

    last_login_at: Mapped[dt.datetime | None]

    # The user's organisation (None: a platform superuser, or a user of the organisation-less
    # DLR-compatible space). No ON DELETE action: an organisation that still has users cannot be
    # deleted (the service answers 409 first).
    organization_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("collections.id"), index=True)

    tokens: Mapped[list[ApiToken]] = relationship(
        back_populates="user", lazy="raise", cascade="all, delete-orphan", passive_deletes=True
    )

    @property
    def full_name(self) -> str:
        return f"{self.first_name} {self.last_name}".strip()


class LoginName(Base):
    """Every name a user logs in with (username and email), normalised as logins compare them
    (``auth.login_names.login_key``): one unique column, so a username can never equal
    another user's email, nor two names differ in case only, whatever the order or concurrency
    of the writes. Maintained by ``auth.login_names`` in the transaction that changes the user."""

    __tablename__ = "login_names"

    name: Mapped[str] = mapped_column(String(1024), primary_key=True)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)


class ApiToken(IDMixin, Base):
    """A bearer credential. Only a keyed digest is stored; the user's *primary* token (the
    DLR-style token shown on the user resource) is also kept encrypted so it can be shown again."""

    __tablename__ = "api_tokens"
    __table_args__ = (Index("ix_api_tokens_user_id_revoked_at", "user_id", "revoked_at"),)

    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(100))
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(12))
    is_primary: Mapped[bool] = mapped_column(Boolean, default=False)
    encrypted: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column()
    expires_at: Mapped[dt.datetime | None]
    revoked_at: Mapped[dt.datetime | None]
    last_used_at: Mapped[dt.datetime | None]

    user: Mapped[User] = relationship(back_populates="tokens", lazy="raise")

    def is_usable(self, now: dt.datetime) -> bool:
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)
