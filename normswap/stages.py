"""Seconds of each stage of a conversion (``report.stage_seconds``): where a conversion's time went."""
from __future__ import annotations

import time


class Stages:
    """A clock read at the end of each stage; a stage named twice adds up."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.last = time.perf_counter()

    def done(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self.last
        self.last = now
