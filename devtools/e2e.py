"""Type names for the e2e fixtures in tests/e2e/conftest.py, importable from test modules."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from devtools.e2ee_user import E2EEUser
from devtools.matrix_user import MatrixUser
from devtools.maubot_standalone import StandaloneBot

# make_user(localpart=None, password="password") -> a started MatrixUser
MakeUser = Callable[..., Awaitable[MatrixUser]]
# make_e2ee_user(localpart=None, password="password", device_id=None) -> a started E2EEUser
MakeE2EEUser = Callable[..., Awaitable[E2EEUser]]


class BotFactory(Protocol):
    """bot_factory(config_overrides=None, **StandaloneBot kwargs) -> a started StandaloneBot."""

    def __call__(
        self, config_overrides: dict[str, Any] | None = None, **kwargs: Any
    ) -> StandaloneBot: ...
