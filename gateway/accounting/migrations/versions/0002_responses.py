"""Stored Responses (POST /v1/responses, GET and DELETE /v1/responses/{id}).

Revision ID: 0002_responses
Revises: 0001_accounting
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_responses"
down_revision: str | None = "0001_accounting"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Spelled out, not imported from tables.py: this revision stays what it
    # is whatever the tables become later.
    op.create_table(
        "responses",
        sa.Column("id", sa.String(80), nullable=False),
        sa.Column("owner", sa.String(40), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("previous_response_id", sa.String(80), nullable=True),
        sa.Column("conversation", sa.Text(), nullable=False),
        sa.Column("response", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_responses"),
    )
    op.create_index("ix_responses_created_at", "responses", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_responses_created_at", table_name="responses")
    op.drop_table("responses")
