"""Shoal gateway service."""
