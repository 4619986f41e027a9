"""Option types shared by the ``device-agent`` commands."""

from __future__ import annotations

import math
from typing import Any

import click


class FiniteFloat(click.FloatRange):
    """A float range that also refuses NaN and the infinities.

    ``click.FloatRange`` compares with ``<`` and ``>``, and every
    comparison with NaN is false, so ``nan`` passes any range: a
    ``--timeout nan`` would then never time out. Config values are held
    to the same rule by ``device_agent.config``.
    """

    def convert(
        self,
        value: Any,
        param: click.Parameter | None,
        ctx: click.Context | None,
    ) -> Any:
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return super().convert(number, param, ctx)
