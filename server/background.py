"""The daemon's background work, owned by one task group that starts and stops together.

Each loop runs a step, logs any error and carries on (one bad batch must not stop demotion or
uploads for the life of the daemon). :meth:`Background.stop` cancels the group and waits for
every loop to finish.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable

log = logging.getLogger("kvstore.background")

Step = Callable[[], Awaitable[object]]


class Background:
    def __init__(self) -> None:
        self._loops: list[tuple[str, Step, float]] = []
        self._runner: asyncio.Task | None = None

    def every(self, name: str, interval_s: float, step: Step) -> None:
        """Run ``step`` every ``interval_s`` (0: again as soon as it returns, for steps that wait)."""
        self._loops.append((name, step, interval_s))

    def once(self, name: str, step: Step) -> None:
        """Run ``step`` once, when the group starts (an error is logged)."""
        self._loops.append((name, step, -1.0))

    def start(self) -> None:
        self._runner = asyncio.create_task(self._run(), name="kvstore-background")

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)

    async def _run(self) -> None:
        if sys.version_info >= (3, 11):
            async with asyncio.TaskGroup() as group:
                for name, step, interval_s in self._loops:
                    group.create_task(_loop(name, step, interval_s), name=f"kvstore-{name}")
        else:  # pragma: no cover
            await asyncio.gather(*(_loop(*loop) for loop in self._loops))


async def _loop(name: str, step: Step, interval_s: float) -> None:
    if interval_s < 0:
        try:
            await step()
        except Exception:
            log.exception("background %s failed", name)
        return
    while True:
        if interval_s:
            await asyncio.sleep(interval_s)
        try:
            await step()
        except Exception:
            log.exception("background %s failed; continuing", name)
            if not interval_s:
                await asyncio.sleep(0.1)  # a step that fails at once must not spin
