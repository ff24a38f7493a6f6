"""Hardening: client name skeletons (no confusable names) and the peer address on audit rows.

Existing names are kept as they are (even outside today's character set) and get their skeleton;
where two existing names already share one, the later client's skeleton is suffixed with its id,
so both stay usable and any new name confusable with either is refused. Key records are not
touched here: a legacy argon2id record is replaced by an HMAC one on its first successful use.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from secquant.server.names import skeleton

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("clients") as batch:
        batch.add_column(sa.Column("name_skeleton", sa.String(100), nullable=True))
    conn = op.get_bind()
    clients = sa.table("clients", sa.column("id", sa.Integer), sa.column("name", sa.String),
                       sa.column("name_skeleton", sa.String))
    seen: set[str] = set()
    for cid, name in conn.execute(sa.select(clients.c.id, clients.c.name).order_by(clients.c.id)).all():
        sk = skeleton(name)[:80]
        if sk in seen:
            sk = f"{sk}#{cid}"
        seen.add(sk)
        conn.execute(clients.update().where(clients.c.id == cid).values(name_skeleton=sk))
    with op.batch_alter_table("clients") as batch:
        batch.alter_column("name_skeleton", existing_type=sa.String(100), nullable=False)
        batch.create_unique_constraint("uq_clients_name_skeleton", ["name_skeleton"])
    with op.batch_alter_table("audit_log") as batch:
        batch.add_column(sa.Column("remote_addr", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("audit_log") as batch:
        batch.drop_column("remote_addr")
    with op.batch_alter_table("clients") as batch:
        batch.drop_constraint("uq_clients_name_skeleton", type_="unique")
        batch.drop_column("name_skeleton")
