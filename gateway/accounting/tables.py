"""The accounting schema, as SQLAlchemy Core tables (the migrations create
them; code reads and writes through these definitions).

Money columns are integer nano-USD (see :mod:`gateway.accounting`); times are
timezone-aware UTC.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

# Constraint names fixed by convention, so migrations can name what they alter.
metadata = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

teams = Table(
    "teams",
    metadata,
    Column("id", String(40), primary_key=True),
    # Unique among the teams not deleted (the index below), so a name frees
    # up when its team is deleted.
    Column("name", String(200), nullable=False),
    Column("budget_nano", BigInteger, nullable=True),
    # "day", "month" or "total"; NULL when there is no budget.
    Column("budget_period", String(8), nullable=True),
    Column("rpm", Integer, nullable=True),
    Column("tpm", Integer, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    # Every change stamps it: replicas poll for rows changed since their last look.
    Column("updated_at", DateTime(timezone=True), nullable=False, index=True),
    Column("deleted_at", DateTime(timezone=True), nullable=True),
)

Index(
    "uq_teams_live_name",
    teams.c.name,
    unique=True,
    sqlite_where=teams.c.deleted_at.is_(None),
    postgresql_where=teams.c.deleted_at.is_(None),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(40), primary_key=True),
    # "sha256:<hex>" as gateway.auth.hash_api_key makes it; the key itself is
    # shown once, at creation, and never stored.
    Column("key_hash", String(80), nullable=False, unique=True),
    Column("name", String(200), nullable=False),
    Column("team_id", String(40), ForeignKey("teams.id"), nullable=True),
    # A JSON list of the model names the key may use; NULL: every model.
    Column("models", JSON, nullable=True),
    Column("budget_nano", BigInteger, nullable=True),
    Column("budget_period", String(8), nullable=True),
    Column("rpm", Integer, nullable=True),
    Column("tpm", Integer, nullable=True),
    Column("expires_at", DateTime(timezone=True), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False, index=True),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
)

# The ledger: exactly one row per request (request_id is unique, so a batch
# written twice after a lost acknowledgement cannot count a request twice).
usage = Table(
    "usage",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    Column("request_id", String(200), nullable=False, unique=True),
    Column("at", DateTime(timezone=True), nullable=False),
    # The UTC day of ``at``: group_by=day reads it the same way on both databases.
    Column("day", Date, nullable=False),
    Column("endpoint", String(40), nullable=False),
    Column("key_id", String(40), nullable=True),
    Column("team_id", String(40), nullable=True),
    Column("user", String(200), nullable=True),
    Column("model", String(200), nullable=True),
    Column("deployment", String(200), nullable=True),
    Column("backend", String(200), nullable=True),
    # The adapter label (a name, "stack", or "" for the base model) and the
    # full list as JSON for a stack.
    Column("adapter", String(200), nullable=True),
    Column("adapters", JSON, nullable=True),
    Column("stream", Boolean, nullable=False, default=False),
    Column("prompt_tokens", Integer, nullable=False, default=0),
    Column("cached_tokens", Integer, nullable=False, default=0),
    Column("completion_tokens", Integer, nullable=False, default=0),
    # What the request is charged at the deployment's token prices (budgets count it).
    Column("cost_nano", BigInteger, nullable=False, default=0),
    # Its share of a self-hosted node's usd_per_hour (what it really cost to run).
    Column("compute_cost_nano", BigInteger, nullable=False, default=0),
    Column("latency_seconds", Float, nullable=False),
    Column("ttft_seconds", Float, nullable=True),
    Column("status", Integer, nullable=False),
    Column("error_type", String(80), nullable=True),
    Column("finish_reason", String(40), nullable=True),
    Column("trace_id", String(32), nullable=True),
    Index("ix_usage_day_key", "day", "key_id"),
    Index("ix_usage_at", "at"),
)

# Self-hosted nodes' cost over time: each row a window of one backend's
# clock, split into the busy share (charged to requests) and idle.
node_costs = Table(
    "node_costs",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    Column("backend", String(200), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("ended_at", DateTime(timezone=True), nullable=False),
    Column("busy_seconds", Float, nullable=False),
    Column("busy_nano", BigInteger, nullable=False),
    Column("idle_nano", BigInteger, nullable=False),
    Index("ix_node_costs_backend_started", "backend", "started_at"),
)

# Stored Responses (POST /v1/responses with store: true; gateway/openai_responses):
# what GET /v1/responses/{id} returns and what previous_response_id continues.
responses = Table(
    "responses",
    metadata,
    Column("id", String(80), primary_key=True),
    # The key id that created it; NULL: created without keys, anyone's.
    Column("owner", String(40), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("model", String(200), nullable=False),
    Column("previous_response_id", String(80), nullable=True),
    # JSON: the input items as resolved (earlier turns included) and the output.
    Column("conversation", Text, nullable=False),
    # JSON: the Response as it was sent.
    Column("response", Text, nullable=False),
    # Bytes of conversation and response: what counts against the owner's
    # [responses] max_bytes_per_key (migration 0003).
    Column("size", BigInteger, nullable=False, server_default="0"),
    # The expiry sweep's order.
    Index("ix_responses_created_at", "created_at"),
    # An owner's Responses, oldest first, and their count and bytes read from
    # the index alone (what each store write reads to keep the bounds).
    Index("ix_responses_owner_created_at", "owner", "created_at", "size"),
)
