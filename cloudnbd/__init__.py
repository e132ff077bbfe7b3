"""cloudnbd: a network block device whose volume lives in cloud object storage."""

__version__ = "0.1.0"
