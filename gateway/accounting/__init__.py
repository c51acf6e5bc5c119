"""Cost accounting: managed keys and teams, prices, the usage ledger, budgets
and rate limits.

The seam to the database is :mod:`gateway.accounting.db` (SQLAlchemy Core over
aiosqlite or asyncpg, migrated by Alembic); the seam to Redis is the limits
module. Nothing here runs on the request path but in-memory lookups, one Redis
round trip when Redis is configured, and a queue put: the ledger is written in
batches by its own task.

Money is an integer number of nano-USD (1e-9 USD) everywhere inside: token
prices are fractions of a cent, and sums of floats drift where a budget must
compare exactly. The admin API and the CLI show USD.
"""
