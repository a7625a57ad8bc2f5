"""Engines: how the K workers of a run execute."""
