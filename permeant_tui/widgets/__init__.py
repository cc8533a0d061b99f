"""Widgets of the workspace. One widget per file; none of them calls the engine."""
