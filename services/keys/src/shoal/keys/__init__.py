"""Shoal keys service."""
