"""The plugin's database: a cache of the Matrix layout (rebuilt at every start) plus what only
lives here: message history, processed marks, the onboarding journal, small key/values.

One repository per table with explicit SQL that runs unchanged on SQLite and PostgreSQL.
"""

from .base import Repository, now_ms
from .chats import Chat, ChatStore
from .journal import JournalEntry, JournalStore
from .kv import KVStore
from .memory import Memory, MemoryStore
from .messages import DuplicateEventError, Message, MessageStore, Role
from .migrations import upgrade_table
from .processed import Processed, ProcessedStore
from .rooms import BotMembership, Room, RoomKind, RoomStore
from .stores import Stores, TopologyChanges
from .users import AccessState, User, UserStore

__all__ = [
    "AccessState",
    "BotMembership",
    "Chat",
    "ChatStore",
    "DuplicateEventError",
    "JournalEntry",
    "JournalStore",
    "KVStore",
    "Memory",
    "MemoryStore",
    "Message",
    "MessageStore",
    "Processed",
    "ProcessedStore",
    "Repository",
    "Role",
    "Room",
    "RoomKind",
    "RoomStore",
    "Stores",
    "TopologyChanges",
    "User",
    "UserStore",
    "now_ms",
    "upgrade_table",
]
