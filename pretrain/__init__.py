"""Pretraining InternImage vision foundation models at scale."""

__version__ = "0.1.0"
