"""Shoal session service."""
