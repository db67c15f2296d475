"""Transaction ids for sends that answer a user event, so the homeserver deduplicates resends.

`PUT /rooms/{room}/send/{type}/{txnId}` is idempotent per user and device (Synapse: the HTTP
response is cached 30-60 min in memory per request path; the event id is kept 24 h in its
database per room, user, device and txn id, across its restarts). A send tied to a user event
therefore gets an id derived from (that event, the attempt, the part), so the same part sent
again after a crash, or retried by the gateway after the server had processed it, is one event.
Sends not tied to a user event keep mautrix's random ids.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

PREFIX = "sfc"


def txn_id(event_id: str, label: str, attempt: str = "") -> str:
    """A short, URL-safe id, the same for the same (user event, attempt, part label).

    `attempt` tells answers to the same event apart (`!ai retry` passes its own event id), so
    a retry is never deduplicated against the first answer.
    """
    key = "\x00".join((event_id, attempt, label)).encode("utf-8", "surrogatepass")
    digest = hashlib.sha256(key).digest()[:16]  # 128 bits: collisions are not a concern
    return f"{PREFIX}.{base64.urlsafe_b64encode(digest).rstrip(b'=').decode('ascii')}"


def content_label(content: dict[str, Any]) -> str:
    """A label for exactly this content: the same edit resent is deduplicated, another is not."""
    canonical = json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def part(txn: str | None, index: int) -> str | None:
    """The id of the `index`-th message of a send split in several (the first keeps `txn`)."""
    return txn if txn is None or index == 0 else f"{txn}.{index}"
