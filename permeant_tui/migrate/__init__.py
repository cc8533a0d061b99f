"""Live migration of an agent between hosts (docs/MIGRATION.md).

The source side (source.py, over transport.py and tls.py): `migrate_agent(engine, agent_id,
target, ...)` moves an agent's KV state to a `permeant serve` target and returns a report;
front ends call `start_migration(engine, agent_id, target, pin, quant, move, on_event)`, which
runs it on its own thread and reports through engine events.

The target side: serve.py starts it; target.py holds its state and authentication, guard.py
bounds and authenticates every request, routes.py answers them, staging.py keeps the staged
files and commit.py verifies and attaches them. protocol.py is what both sides share.
No Textual and no MLX import here at module level.
"""

from .protocol import MigrationError
from .source import MigrationReport, migrate_agent, start_migration

__all__ = ["MigrationError", "MigrationReport", "migrate_agent", "start_migration"]
