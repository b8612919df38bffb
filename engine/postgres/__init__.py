"""The shared invocation store: PostgreSQL, for several nodes on one database."""

from .schema import CHANNELS, ENDED, LOGGED, MIGRATIONS, QUEUED, TERMINATE, migrate
from .store import Node, NodeIdInUse, PostgresStore

__all__ = [
    "CHANNELS", "ENDED", "LOGGED", "MIGRATIONS", "QUEUED", "TERMINATE",
    "Node", "NodeIdInUse", "PostgresStore", "migrate",
]
