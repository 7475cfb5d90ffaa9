"""The tier stack: the daemon's tiers, fastest first, built from configuration.

:func:`build_stack` turns :meth:`ServerConfig.tier_specs` into open-able tiers and the
:class:`~kvstore.layout.Layout` the core decides with. Adding or removing a tier is configuration:
a built-in section (``[hbm]``, ``[nvme]``, ``[s3]``) or a ``[[plugin_tiers]]`` entry naming any
:class:`~kvstore.tiers.Tier` subclass. A tier that cannot run on this machine (HBM without a GPU)
is left out with a log line.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from kvstore.config import ServerConfig, build_section
from kvstore.errors import ConfigError
from kvstore.layout import Layout, Level, Watermarks
from kvstore.tiers import tier_class
from kvstore.tiers.base import MemoryTier, Tier

log = logging.getLogger("kvstore.tiers")


@dataclass(slots=True)
class TierStack:
    layout: Layout
    tiers: list[Tier]

    @property
    def landing(self) -> MemoryTier:
        """The tier puts land in and same-host clients map."""
        return self.tiers[self.layout.landing]

    def release(self, level: int, location) -> None:
        """Give ``location`` back to the tier at ``level`` (what the catalog calls when a dropped
        copy's last hold goes)."""
        self.tiers[level].release(location)

    async def open(self) -> None:
        for tier in self.tiers:
            await tier.open()

    async def close(self) -> None:
        """Close every tier, slowest first; one failing does not keep the others open."""
        errors = []
        for tier in reversed(self.tiers):
            try:
                await tier.close()
            except Exception as exc:  # noqa: PERF203 - each tier must get its close
                errors.append(exc)
        if errors:
            raise errors[0]


def build_stack(config: ServerConfig) -> TierStack:
    """Build (but do not open) the tiers ``config`` asks for. Raises ConfigError naming a bad one;
    tiers already built are closed again."""
    tiers: list[Tier] = []
    levels: list[Level] = []
    try:
        plugins = {plugin.name for plugin in config.plugin_tiers}
        for spec in config.tier_specs():
            try:
                cls = tier_class(spec.cls)
            except ConfigError as exc:
                setting = f"plugin_tiers.{spec.name}.class" if spec.name in plugins else f"tier {spec.name}"
                raise ConfigError(f"{setting}: {exc}") from None
            tier_config = spec.config
            if isinstance(tier_config, Mapping):  # a plugin's options
                tier_config = build_section(cls.config_class, tier_config, f"plugin_tiers.{spec.name}.options.")
            reason = cls.unavailable(tier_config)
            if reason is not None:
                log.warning("tier %s is configured but left out: %s", spec.name, reason)
                continue
            tiers.append(cls.from_config(tier_config))
            high, low = getattr(tier_config, "high_watermark", None), getattr(tier_config, "low_watermark", None)
            levels.append(Level(
                index=len(levels), name=spec.name, kind=cls.kind, capabilities=cls.capabilities,
                watermarks=Watermarks(high=high, low=low) if high is not None and low is not None else None,
            ))
        return TierStack(layout=Layout.of(tuple(levels)), tiers=tiers)
    except BaseException:
        for tier in reversed(tiers):
            with contextlib.suppress(Exception):
                _close_now(tier)
        raise


def _close_now(tier: Tier) -> None:
    """Release a tier that was built but never opened, outside any event loop."""
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(tier.close())
        return
    # Inside a loop (a test building a daemon): DRAM and NVMe release synchronously on close's
    # first step, so driving the coroutine once is enough.
    coro = tier.close()
    try:
        coro.send(None)
    except StopIteration:
        pass
    finally:
        coro.close()
