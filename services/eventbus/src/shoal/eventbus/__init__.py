"""Shoal eventbus service."""
