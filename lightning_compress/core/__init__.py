"""Machinery shared by every technique (no technique-specific code lives here)."""
