"""Where a request's time goes: consecutive stages from arrival to the end of the response.

The metrics middleware starts a :class:`Timeline` when a request arrives; the route marks the end
of each stage as it goes (body read, input decoded, queued, coded in the worker, handed back,
output encoded), and the middleware closes it when the response has been sent, the last stage
(``respond``: building and writing the response) ending there. The stages are consecutive and
cover the whole request, so they add up to ``lalic_request_duration_seconds``; the middleware
records them in ``lalic_request_stage_seconds`` for successful requests (issue 39).
"""

from __future__ import annotations

import time
from typing import Any

from starlette.types import Scope

TIMELINE_STATE_KEY = "lalic_timeline"
"""Key in the request state (``scope["state"]``) holding the request's :class:`Timeline`."""

READ_BODY = "read_body"
DECODE_IMAGE = "decode_image"
PARSE = "parse"
QUEUE = "queue"
CODEC = "codec"
HANDOFF = "handoff"
ENCODE_IMAGE = "encode_image"
RESPOND = "respond"
STAGES = (READ_BODY, DECODE_IMAGE, PARSE, QUEUE, CODEC, HANDOFF, ENCODE_IMAGE, RESPOND)
"""Every stage label, in request order (/compress has no parse or encode_image, /decompress no
decode_image)."""


class Timeline:
    """Consecutive stages of one request, on the ``time.monotonic()`` clock."""

    def __init__(self, started: float) -> None:
        self.last = started
        self.stages: list[tuple[str, float]] = []

    def until(self, stage: str, moment: float) -> None:
        """``stage`` ran from the end of the previous one until ``moment`` (``time.monotonic()``,
        for instance a time the worker thread took)."""
        moment = max(moment, self.last)
        self.stages.append((stage, moment - self.last))
        self.last = moment

    def mark(self, stage: str) -> None:
        """``stage`` ended now."""
        self.until(stage, time.monotonic())


def timeline_of(scope: Scope) -> Timeline:
    """The request's timeline (a detached one, which nothing records, outside the middleware)."""
    state: dict[str, Any] = scope.setdefault("state", {})
    if TIMELINE_STATE_KEY not in state:
        state[TIMELINE_STATE_KEY] = Timeline(time.monotonic())
    return state[TIMELINE_STATE_KEY]
