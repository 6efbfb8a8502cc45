"""Electronic postage: meter (PSD), indicia, provider and post office."""

from meter.errors import MeterError

__all__ = ["MeterError", "__version__"]

__version__ = "0.1.0"
