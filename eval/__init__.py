"""The evaluation entry points, judges and configs; installed as ``align_kit.eval`` (see pyproject.toml)."""
