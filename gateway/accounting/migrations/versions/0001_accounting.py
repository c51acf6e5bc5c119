"""Accounting: teams, managed API keys, the usage ledger, self-hosted node costs.

Revision ID: 0001_accounting
Revises:
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from gateway.accounting.tables import api_keys, node_costs, teams, usage

revision: str = "0001_accounting"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The first revision creates the tables as gateway/accounting/tables.py
# defines them; later revisions must spell out each change instead.
_TABLES = (teams, api_keys, usage, node_costs)


def upgrade() -> None:
    bind = op.get_bind()
    for table in _TABLES:
        table.create(bind)


def downgrade() -> None:
    bind = op.get_bind()
    for table in reversed(_TABLES):
        table.drop(bind)
