"""Port helpers shared by the throwaway test services."""
from __future__ import annotations

from app.local_broker import free_port

__all__ = ["free_port"]
