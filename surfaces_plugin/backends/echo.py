"""A backend without network: answers `echo: <last user message>`, word by word."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

from ..config import BackendSpec
from ..tokens import estimate_tokens
from .base import Backend, Chunk, GenerationRequest, Usage

# Split before every word that follows whitespace, so joining the pieces restores the text exactly.
_WORD_BOUNDARY = re.compile(r"(?<=\s)(?=\S)")


class EchoBackend(Backend):
    def __init__(self, spec: BackendSpec, *, delay_s: float = 0.02) -> None:
        super().__init__(spec)
        self.delay_s = delay_s

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        last_user = next((m.content for m in reversed(request.messages) if m.role == "user"), "")
        answer = f"echo: {last_user}"
        for i, piece in enumerate(_WORD_BOUNDARY.split(answer)):
            if i and self.delay_s > 0:
                await asyncio.sleep(self.delay_s)  # visible pacing, so streaming edits can be seen
            yield Chunk(text=piece)
        # Counted with the plugin's own estimator, so an echo's "usage" never skews calibration.
        prompt = sum(estimate_tokens(m.content) for m in request.messages)
        yield Chunk(usage=Usage(prompt_tokens=prompt, completion_tokens=estimate_tokens(answer)))
