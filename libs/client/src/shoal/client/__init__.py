"""Shoal async client."""
