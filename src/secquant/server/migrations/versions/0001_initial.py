"""Initial schema: API clients (keys, roles, budgets) and the audit log.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "clients",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("key_hash", sa.String(255), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("rotated_at", sa.DateTime(timezone=True)),
        sa.Column("revoked_at", sa.DateTime(timezone=True)),
        sa.Column("max_queries", sa.BigInteger()),
        sa.Column("window_s", sa.Integer(), nullable=False, server_default="86400"),
        sa.Column("window_start", sa.Float()),
        sa.Column("window_used", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("queries_total", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("rate_per_s", sa.Float()),
        sa.Column("burst", sa.Integer()),
        sa.PrimaryKeyConstraint("id", name="pk_clients"),
        sa.UniqueConstraint("name", name="uq_clients_name"),
        sa.UniqueConstraint("key_id", name="uq_clients_key_id"),
        sa.CheckConstraint("role IN ('user', 'admin')", name="ck_clients_role"),
    )
    op.create_table(
        "audit_log",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("client_id", sa.Integer()),
        sa.Column("client_name", sa.String(100)),
        sa.Column("method", sa.String(10), nullable=False),
        sa.Column("route", sa.String(200), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("input_sha256", sa.String(64)),
        sa.Column("rows", sa.Integer()),
        sa.Column("latency_ms", sa.Float()),
        sa.Column("detail", sa.String(500)),
        sa.PrimaryKeyConstraint("id", name="pk_audit_log"),
    )
    op.create_index("ix_audit_log_ts", "audit_log", ["ts"])
    op.create_index("ix_audit_log_client_id", "audit_log", ["client_id"])


def downgrade() -> None:
    op.drop_index("ix_audit_log_client_id", table_name="audit_log")
    op.drop_index("ix_audit_log_ts", table_name="audit_log")
    op.drop_table("audit_log")
    op.drop_table("clients")
