"""Persistence of every agent's state: tables, schema versions and the group-commit journal."""

from agents.persistence.database import Database, open_database
from agents.persistence.journal import Journal

__all__ = ["Database", "Journal", "open_database"]
