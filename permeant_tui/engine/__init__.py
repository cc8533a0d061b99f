"""The engine: models, agents, KV caches, persistence and USXF. Never imports Textual."""
