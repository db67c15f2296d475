"""The aiohttp session a service was given, or one of its own made when first needed."""

from __future__ import annotations

import aiohttp


class LazySession:
    """A given session is shared and never closed here; an own one is created on first use (it
    needs a running event loop) and closed by `close`."""

    def __init__(self, given: aiohttp.ClientSession | None = None) -> None:
        self._given = given
        self._own: aiohttp.ClientSession | None = None

    def get(self) -> aiohttp.ClientSession:
        if self._given is not None:
            return self._given
        if self._own is None or self._own.closed:
            self._own = aiohttp.ClientSession()
        return self._own

    async def close(self) -> None:
        if self._own is not None:
            await self._own.close()
            self._own = None
