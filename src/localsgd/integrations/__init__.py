"""Integrations with other training libraries: :mod:`localsgd.integrations.accelerate`."""
