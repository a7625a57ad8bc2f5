"""Helpers every layer shares: validation and typed configs (:mod:`.checks`), atomic
file writes (:mod:`.files`), and nested data (:mod:`.nest`). Nothing heavy is imported."""
