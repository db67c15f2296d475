"""The maubot Plugin subclass: lifecycle and wiring only."""

from __future__ import annotations

from maubot import Plugin
from maubot.handlers import event
from mautrix.types import (
    EncryptedEvent,
    EventType,
    MessageEvent,
    ReactionEvent,
    RedactionEvent,
    StateEvent,
)
from mautrix.util.async_db import UpgradeTable
from mautrix.util.config import BaseProxyConfig

from . import layout
from .app import Incoming, Surfaces
from .config import (
    Config,
    ConfigError,
    Settings,
    check_encryption,
    parse_settings,
    plain_config,
)
from .store.migrations import upgrade_table


class SurfacesPlugin(Plugin):
    app: Surfaces | None = None

    @classmethod
    def get_config_class(cls) -> type[BaseProxyConfig]:
        return Config

    @classmethod
    def get_db_upgrade_table(cls) -> UpgradeTable:
        return upgrade_table

    async def pre_start(self) -> None:
        # Handlers go live before start(); what arrives before the app exists waits here.
        self._early: list[Incoming] = []

    def _settings(self) -> Settings:
        """The validated config, checked against what this client can do; raises ConfigError."""
        settings = parse_settings(plain_config(self.config))
        check_encryption(settings, can_encrypt=self.client.crypto is not None)
        return settings

    async def start(self) -> None:
        self.config.load_and_update()
        try:
            settings = self._settings()
        except ConfigError as e:
            self.log.error("Surfaces cannot start: %s. Fix it in the instance's config.", e)
            raise
        self.app = Surfaces(
            client=self.client, database=self.database, settings=settings, log=self.log
        )
        await self.app.start(early_events=self._early)
        self._early = []

    async def stop(self) -> None:
        if self.app is not None:
            await self.app.stop()

    def on_external_config_update(self) -> None:
        self.config.load_and_update()
        try:
            settings = self._settings()
        except ConfigError as e:
            self.log.error("Config update rejected, the last good config stays in force: %s", e)
            return
        if self.app is not None:
            self.app.apply_settings(settings)

    @event.on(EventType.ROOM_MESSAGE)
    async def on_message(self, evt: MessageEvent) -> None:
        if self.app is None:
            self._early.append(evt)
            return
        await self.app.on_message(evt)

    @event.on(EventType.ROOM_ENCRYPTED)
    async def on_encrypted(self, evt: EncryptedEvent) -> None:
        # maubot decrypts what it can and dispatches it as a message; this sees every encrypted
        # event, and acts only on those it could not decrypt.
        if self.app is not None:
            await self.app.on_encrypted(evt)

    @event.on(EventType.ROOM_REDACTION)
    async def on_redaction(self, evt: RedactionEvent) -> None:
        if self.app is None:
            self._early.append(evt)
            return
        await self.app.on_redaction(evt)

    @event.on(EventType.REACTION)
    async def on_reaction(self, evt: ReactionEvent) -> None:
        # Reactions in encrypted rooms arrive here decrypted, like messages.
        if self.app is None:
            self._early.append(evt)
            return
        await self.app.on_reaction(evt)

    @event.on(EventType.SPACE_CHILD)
    @event.on(EventType.SPACE_PARENT)
    @event.on(EventType.ROOM_TOMBSTONE)
    @event.on(EventType.ROOM_POWER_LEVELS)
    @event.on(layout.BINDING)
    async def on_layout_state(self, evt: StateEvent) -> None:
        if self.app is not None:
            self.app.on_layout_state(evt)

    @event.on(EventType.ROOM_MEMBER)
    async def on_member(self, evt: StateEvent) -> None:
        if self.app is not None:
            await self.app.on_member(evt)
