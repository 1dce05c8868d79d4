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

#: The suppression log's guard, made on every open (the table may be newer than the
#: database): idempotent statements per dialect.
SUPPRESSION_APPEND_ONLY: Final = {
    "sqlite": [
        """CREATE TRIGGER IF NOT EXISTS kiln_suppression_no_update BEFORE UPDATE ON
        kiln_suppression BEGIN
        SELECT RAISE(ABORT, 'kiln_suppression is append-only: UPDATE refused'); END""",
        """CREATE TRIGGER IF NOT EXISTS kiln_suppression_no_delete BEFORE DELETE ON
        kiln_suppression BEGIN
        SELECT RAISE(ABORT, 'kiln_suppression is append-only: DELETE refused'); END""",
    ],
    "postgresql": [
        """CREATE OR REPLACE FUNCTION kiln_suppression_append_only() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'kiln_suppression is append-only: % refused', TG_OP;
        END $$""",
        """CREATE OR REPLACE TRIGGER kiln_suppression_no_change BEFORE UPDATE OR DELETE ON
        kiln_suppression FOR EACH ROW EXECUTE FUNCTION kiln_suppression_append_only()""",
        """CREATE OR REPLACE TRIGGER kiln_suppression_no_truncate BEFORE TRUNCATE ON
        kiln_suppression FOR EACH STATEMENT EXECUTE FUNCTION kiln_suppression_append_only()""",
    ],
}
