"""Progress of a long encoder job (adapt, promote, rollback): logged, and handed to the worker, which
turns it into job progress and lease renewals."""

from __future__ import annotations

from collections.abc import Callable

import structlog

log = structlog.get_logger("ingest.progress")


class Progress:
    """Where a long run is; the worker turns it into job progress and lease renewals."""

    def __init__(self, callback: Callable[[str, float], None] | None = None) -> None:
        self.callback = callback

    def __call__(self, stage: str, fraction: float = 0.0) -> None:
        log.info("adapt_progress", stage=stage, fraction=round(fraction, 3))
        if self.callback is not None:
            self.callback(stage, fraction)
