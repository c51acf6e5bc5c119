"""Stored Responses' bounds: each row's size, and an index of each owner's
rows by age (what [responses] max_per_key and max_bytes_per_key read).

Revision ID: 0003_responses_bounds
Revises: 0002_responses
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_responses_bounds"
down_revision: str | None = "0002_responses"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Spelled out, not imported from tables.py (as 0002).
    op.add_column(
        "responses", sa.Column("size", sa.BigInteger(), nullable=False, server_default="0")
    )
    # The rows stored before: their size in bytes, as the store counts it.
    if op.get_bind().dialect.name == "postgresql":
        size = "octet_length(conversation) + octet_length(response)"
    else:
        size = "length(CAST(conversation AS BLOB)) + length(CAST(response AS BLOB))"
    op.execute(f"UPDATE responses SET size = {size}")
    op.create_index("ix_responses_owner_created_at", "responses", ["owner", "created_at", "size"])


def downgrade() -> None:
    op.drop_index("ix_responses_owner_created_at", table_name="responses")
    with op.batch_alter_table("responses") as batch:
        batch.drop_column("size")
