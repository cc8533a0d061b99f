"""Live migration of an agent between hosts (docs/MIGRATION.md).

`permeant serve` runs a target daemon (server.py: Starlette on uvicorn, TLS with a pinned
self-signed certificate, every request signed with the source workspace's Ed25519 key);
`permeant migrate AGENT --to HOST:PORT` moves an agent's KV state there (client.py). The UI
calls `migrate_agent(engine, agent_id, target, pin, quant, move, progress)` from a thread that
is not the engine worker. No Textual and no MLX import here at module level.
"""

from .protocol import MigrationError


def migrate_agent(engine, agent_id, target, pin=None, quant="none", move=False, progress=None,
                  **kw):
    """See client.migrate_agent (imported lazily: the CLI parser imports this package)."""
    from .client import migrate_agent as _migrate

    return _migrate(engine, agent_id, target, pin, quant, move, progress, **kw)


__all__ = ["MigrationError", "migrate_agent"]
