"""The plugin's database: a cache of the Matrix layout (rebuilt at every start) plus what only
lives here: message history and the processed marks.

One repository per table with explicit SQL that runs unchanged on SQLite and PostgreSQL.
"""

from .base import Repository
from .chats import Chat, ChatStore
from .memory import CachedNotes, MemoryStore
from .messages import DuplicateEventError, Message, MessageRole, MessageStore
from .migrations import upgrade_table
from .processed import Processed, ProcessedStore
from .rooms import BotMembership, Room, RoomKind, RoomStore
from .stores import Stores
from .usage import UsageEntry, UsageStore, UsageSum
from .users import AccessState, User, UserStore

__all__ = [
    "AccessState",
    "BotMembership",
    "CachedNotes",
    "Chat",
    "ChatStore",
    "DuplicateEventError",
    "MemoryStore",
    "Message",
    "MessageRole",
    "MessageStore",
    "Processed",
    "ProcessedStore",
    "Repository",
    "Room",
    "RoomKind",
    "RoomStore",
    "Stores",
    "UsageEntry",
    "UsageStore",
    "UsageSum",
    "User",
    "UserStore",
    "upgrade_table",
]
