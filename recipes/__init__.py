"""The recipes, one script per training stage; installed as ``align_kit.recipes`` (see pyproject.toml)."""
