"""The built-in training recipes (``*.toml``), shipped inside the package so an installed difflab
runs them: ``difflab train digits`` or ``difflab.recipes.path("digits")``."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def available() -> list[str]:
    """Names of the built-in recipes."""
    return sorted(p.name[:-5] for p in resources.files(__name__).iterdir() if p.name.endswith(".toml"))


def path(name: str) -> Path:
    """The file of built-in recipe ``name`` (with or without ``.toml``)."""
    stem = name[:-5] if name.endswith(".toml") else name
    if stem not in available():
        raise FileNotFoundError(f"no built-in recipe {name!r}; the built-in recipes are: {', '.join(available())}. "
                                "Give a path to a .toml file for your own.")
    return Path(str(resources.files(__name__) / f"{stem}.toml"))


def resolve(name_or_path: str | Path) -> Path:
    """A recipe file: an existing path as given, else the built-in recipe of that name."""
    candidate = Path(name_or_path)
    if candidate.is_file():
        return candidate
    if candidate.suffix in ("", ".toml") and candidate.parent == Path("."):
        return path(candidate.name)
    raise FileNotFoundError(f"no config file at {candidate}; built-in recipes: {', '.join(available())}")
