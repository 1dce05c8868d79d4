"""kiln's tables: one SQLModel row type per table, and the triggers that keep the decision
log append-only (SQLite and PostgreSQL). `kiln.store.Store` reads and writes them; the
layout's version is `kiln.store.SCHEMA_VERSION`.
"""

from __future__ import annotations

from datetime import date
from typing import Final

from sqlalchemy import (
    BigInteger,
    Column,
    Integer,
    LargeBinary,
    Table,
    Text,
)
from sqlmodel import Field, SQLModel

__all__ = [
    "APPEND_ONLY",
    "SUPPRESSION_APPEND_ONLY",
    "TABLES",
    "AutomationRow",
    "CountsRow",
    "DecisionRow",
    "HeldRow",
    "MetaRow",
    "PositionRow",
    "PushbackRow",
    "SnapshotRow",
    "SuppressionBatchRow",
    "SuppressionRow",
    "table_of",
]


class MetaRow(SQLModel, table=True):
    __tablename__ = "kiln_meta"

    key: str = Field(primary_key=True)
    value: str


class PositionRow(SQLModel, table=True):
    __tablename__ = "kiln_ramp_positions"

    plan: str = Field(primary_key=True)
    batch: str = Field(primary_key=True)
    provider: str = Field(primary_key=True)
    step: int
    paused: bool
    idle_days: int
    last_sending_day: date | None = None
    days_without_advance: int
    updated_at_ms: int = Field(sa_type=BigInteger)


class SnapshotRow(SQLModel, table=True):
    __tablename__ = "kiln_counter_snapshots"

    node: str = Field(primary_key=True)
    saved_at_ms: int = Field(sa_type=BigInteger)
    data: bytes = Field(sa_type=LargeBinary)


class CountsRow(SQLModel, table=True):
    __tablename__ = "kiln_feedback_counts"

    day: date = Field(primary_key=True)
    ip: str = Field(primary_key=True)
    provider: str = Field(primary_key=True)
    granted: int = Field(sa_type=BigInteger)
    delivered: int = Field(sa_type=BigInteger)
    deferred: int = Field(sa_type=BigInteger)
    bounced: int = Field(sa_type=BigInteger)
    complaints: int = Field(sa_type=BigInteger)


class DecisionRow(SQLModel, table=True):
    __tablename__ = "kiln_decisions"

    # SQLite only autoincrements an INTEGER PRIMARY KEY; PostgreSQL gets a 64-bit identity.
    id: int | None = Field(
        default=None,
        sa_column=Column(BigInteger().with_variant(Integer(), "sqlite"), primary_key=True),
    )
    at_ms: int = Field(sa_type=BigInteger, index=True)
    kind: str
    subject: str = Field(index=True)
    action: str
    reason: str
    evidence: str = Field(sa_type=Text)


class AutomationRow(SQLModel, table=True):
    __tablename__ = "kiln_automations"

    plan: str = Field(primary_key=True)
    id: str = Field(primary_key=True)
    state: str
    data: str = Field(sa_type=Text)
    updated_at_ms: int = Field(sa_type=BigInteger)


class PushbackRow(SQLModel, table=True):
    __tablename__ = "kiln_pushback"

    day: date = Field(primary_key=True)
    ip: str = Field(primary_key=True)
    provider: str = Field(primary_key=True)
    cls: str = Field(primary_key=True)
    hour: int = Field(primary_key=True)
    rule: str = Field(primary_key=True)
    count: int = Field(sa_type=BigInteger)


class HeldRow(SQLModel, table=True):
    """A recipient Postfix deferred on kiln's word, by its id in the engine's release queue."""

    __tablename__ = "kiln_postfix_held"

    node: str = Field(primary_key=True)
    id: int = Field(sa_type=BigInteger, primary_key=True)
    queue_id: str
    recipient: str
    pool: str
    provider: str
    since_ms: int = Field(sa_type=BigInteger)


class SuppressionRow(SQLModel, table=True):
    """One event of the suppression list's append-only log (docs/suppression.md): never
    updated or deleted; taking an address off the list is an event of its own (`remove`)."""

    __tablename__ = "kiln_suppression"

    id: int | None = Field(
        default=None,
        sa_column=Column(BigInteger().with_variant(Integer(), "sqlite"), primary_key=True),
    )
    at_ms: int = Field(sa_type=BigInteger, index=True)
    #: The keyed hash the core holds (`SuppressionSet.fingerprint`).
    fingerprint: int = Field(sa_type=BigInteger, index=True)
    #: The normalised address, or "" when only hashes are kept.
    address: str
    #: "" for the global list, else a sending domain, stream or tenant.
    scope: str
    #: hard_bounce, complaint, unsubscribe, manual, soft_bounce, or remove.
    event: str
    expires_ms: int | None = Field(default=None, sa_type=BigInteger)
    source: str
    evidence: str = Field(sa_type=Text)


class SuppressionBatchRow(SQLModel, table=True):
    """Events of an import, a range of the suppression log's ids, as columns
    (`kiln.storebatch`): integers packed little-endian, text joined and zlib-compressed. Never
    updated or deleted either; `kiln_suppression` holds an `import` event right after the
    range."""

    __tablename__ = "kiln_suppression_batch"

    id: int | None = Field(default=None, primary_key=True)
    #: The log ids of the first and the last event.
    first_id: int = Field(sa_type=BigInteger, unique=True)
    last_id: int = Field(sa_type=BigInteger, unique=True)
    source: str
    #: The event names, comma-separated, that the `event` bytes index.
    names: str
    at_ms: bytes = Field(sa_type=LargeBinary)
    fingerprint: bytes = Field(sa_type=LargeBinary)
    event: bytes = Field(sa_type=LargeBinary)
    #: int64s, the smallest for none; NULL when no event has one.
    expires_ms: bytes | None = Field(default=None, sa_type=LargeBinary)
    #: Every event's scope, or NULL when they differ and `scopes` holds them.
    scope: str | None = None
    scopes: bytes | None = Field(default=None, sa_type=LargeBinary)
    address: bytes = Field(sa_type=LargeBinary)
    evidence: bytes = Field(sa_type=LargeBinary)


def table_of(model: type[SQLModel]) -> Table:
    """The SQLAlchemy table behind a table model."""
    return SQLModel.metadata.tables[str(model.__tablename__)]


TABLES: Final = [
    table_of(m)
    for m in (
        MetaRow,
        PositionRow,
        SnapshotRow,
        CountsRow,
        DecisionRow,
        AutomationRow,
        PushbackRow,
        HeldRow,
        SuppressionRow,
        SuppressionBatchRow,
    )
]

APPEND_ONLY: Final = {
    "sqlite": [
        """CREATE TRIGGER kiln_decisions_no_update BEFORE UPDATE ON kiln_decisions
        BEGIN SELECT RAISE(ABORT, 'kiln_decisions is append-only: UPDATE refused'); END""",
        """CREATE TRIGGER kiln_decisions_no_delete BEFORE DELETE ON kiln_decisions
        BEGIN SELECT RAISE(ABORT, 'kiln_decisions is append-only: DELETE refused'); END""",
    ],
    "postgresql": [
        """CREATE OR REPLACE FUNCTION kiln_decisions_append_only() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'kiln_decisions is append-only: % refused', TG_OP;
        END $$""",
        """CREATE TRIGGER kiln_decisions_no_change BEFORE UPDATE OR DELETE ON kiln_decisions
        FOR EACH ROW EXECUTE FUNCTION kiln_decisions_append_only()""",
        """CREATE TRIGGER kiln_decisions_no_truncate BEFORE TRUNCATE ON kiln_decisions
        FOR EACH STATEMENT EXECUTE FUNCTION kiln_decisions_append_only()""",
    ],
}

#: The suppression log's tables: append-only in the database itself.
_SUPPRESSION_TABLES: Final = ("kiln_suppression", "kiln_suppression_batch")


def _sqlite_guard(table: str) -> list[str]:
    """SQLite triggers that refuse UPDATE and DELETE on `table` (kiln's own names only)."""
    return [
        f"""CREATE TRIGGER IF NOT EXISTS {table}_no_{verb.lower()} BEFORE {verb} ON {table}
        BEGIN SELECT RAISE(ABORT, '{table} is append-only: {verb} refused'); END"""
        for verb in ("UPDATE", "DELETE")
    ]


def _postgresql_guard(table: str) -> list[str]:
    """PostgreSQL triggers that refuse UPDATE, DELETE and TRUNCATE on `table`."""
    return [
        f"""CREATE OR REPLACE TRIGGER {table}_no_change BEFORE UPDATE OR DELETE ON {table}
        FOR EACH ROW EXECUTE FUNCTION kiln_suppression_append_only()""",
        f"""CREATE OR REPLACE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table}
        FOR EACH STATEMENT EXECUTE FUNCTION kiln_suppression_append_only()""",
    ]


#: The suppression log's guard, made on every open (the tables may be newer than the
#: database): idempotent statements per dialect.
SUPPRESSION_APPEND_ONLY: Final = {
    "sqlite": [s for table in _SUPPRESSION_TABLES for s in _sqlite_guard(table)],
    "postgresql": [
        """CREATE OR REPLACE FUNCTION kiln_suppression_append_only() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP;
        END $$""",
        *(s for table in _SUPPRESSION_TABLES for s in _postgresql_guard(table)),
    ],
}
