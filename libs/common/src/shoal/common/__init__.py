"""Shoal shared library."""
