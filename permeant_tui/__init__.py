"""Permeant: a terminal workspace for persistent, portable LLM agents."""

__version__ = "0.1.0"
