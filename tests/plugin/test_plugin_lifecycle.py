"""The maubot Plugin class: config loading at start and live updates from the web UI."""

from __future__ import annotations

import asyncio
import copy
import logging

import pytest
from mautrix.util.config import RecursiveDict
from ruamel.yaml.comments import CommentedMap

from surfaces_plugin.config import Config, ConfigError
from surfaces_plugin.plugin import SurfacesPlugin

from .conftest import BASE_CONFIG
from .fakes import FakeClient


def commented(data):
    if isinstance(data, dict):
        result = CommentedMap()
        for k, v in data.items():
            result[k] = commented(v)
        return result
    if isinstance(data, list):
        return [commented(v) for v in data]
    return data


class Holder:
    """Stands in for maubot's instance: holds the instance config the web UI edits."""

    def __init__(self, data) -> None:
        self.data = commented(copy.deepcopy(data))

    def config(self) -> Config:
        return Config(
            load=lambda: self.data,
            load_base=lambda: RecursiveDict(commented(copy.deepcopy(BASE_CONFIG)), CommentedMap),
            save=lambda d: None,
        )


def make_plugin(db, holder: Holder, caplog) -> SurfacesPlugin:
    return SurfacesPlugin(
        client=FakeClient(),  # type: ignore[arg-type]
        loop=asyncio.get_running_loop(),
        http=None,  # type: ignore[arg-type]
        instance_id="test",
        log=logging.getLogger("surfaces.lifecycle"),
        config=holder.config(),
        database=db,
        webapp=None,
        webapp_url=None,
        loader=None,  # type: ignore[arg-type]
    )


async def test_broken_config_refuses_to_start_with_clear_message(db, caplog) -> None:
    holder = Holder({**BASE_CONFIG, "default_agent": "ghost"})
    plugin = make_plugin(db, holder, caplog)
    await plugin.pre_start()
    with pytest.raises(ConfigError):
        await plugin.start()
    assert "Surfaces cannot start: invalid config at `default_agent`" in caplog.text


async def test_live_update_applies_and_bad_update_keeps_last_good(db, caplog) -> None:
    caplog.set_level(logging.INFO)
    holder = Holder(BASE_CONFIG)
    plugin = make_plugin(db, holder, caplog)
    await plugin.pre_start()
    await plugin.start()
    try:
        holder.data["command_prefix"] = "bot"
        plugin.on_external_config_update()
        assert plugin.app is not None and plugin.app.settings.command_prefix == "bot"
        assert "changed: command_prefix" in caplog.text
        holder.data["backends"][0]["type"] = "gpt"
        plugin.on_external_config_update()
        assert "Config update rejected, the last good config stays in force" in caplog.text
        assert "backends[0].type" in caplog.text
        assert plugin.app.settings.backends["echo"].type == "echo"
        assert plugin.app.settings.command_prefix == "bot"
    finally:
        await plugin.stop()
