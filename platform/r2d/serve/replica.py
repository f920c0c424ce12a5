"""What every engine replica shares: the ingress's non-generation calls, and the registry alias poller."""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("r2d.serve")


class EngineCalls:
    """What the ingress asks of a backend replica besides generation, passed to ``self.engine``."""

    engine: object

    async def info(self) -> dict:
        return self.engine.info()

    async def warmup(self) -> bool:
        return await self.engine.warmup()

    async def reload(self, force: bool = False) -> dict:
        return await self.engine.reload(force)


async def poll_reload(engine, every_s: float) -> None:
    """Reload whenever the source's alias moves; errors are logged and retried next time."""
    while True:
        await asyncio.sleep(every_s)
        try:
            result = await engine.reload()
            if result.get("reloaded"):
                log.warning("model reloaded: now %s", result.get("version"))
        except Exception as err:
            log.warning("reload check failed: %s", err)
