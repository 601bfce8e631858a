"""Training helpers: EMA and a guarded optimiser step."""

from .ema import EMA, PowerEMA, power_exponent
from .step import optimizer_step

__all__ = ["EMA", "PowerEMA", "power_exponent", "optimizer_step"]
