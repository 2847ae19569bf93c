"""Loading plugins: an object named ``package.module:attribute``, or an entry
point of a group (``jpaged.scheduling_policies``, ``jpaged.logits_processors``)
that an installed distribution declares, e.g. in its pyproject.toml::

    [project.entry-points."jpaged.scheduling_policies"]
    edf = "my_pkg.policies:EarliestDeadlineFirst"

Errors name the value that failed, as a ValueError.
"""

from __future__ import annotations

import importlib
from importlib import metadata


def entry_point_names(group: str) -> list[str]:
    return sorted(ep.name for ep in metadata.entry_points(group=group))


def load_plugin(group: str, name: str, what: str):
    """The object ``name`` refers to: ``module:attr`` or an entry point of ``group``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what}={name!r} must be a non-empty string")
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            obj = importlib.import_module(module)
        except ImportError as e:
            raise ValueError(f"{what}={name!r}: cannot import {module!r} ({e})") from e
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise ValueError(f"{what}={name!r}: {module!r} has no attribute {attr!r}")
            obj = getattr(obj, part)
        return obj
    eps = [ep for ep in metadata.entry_points(group=group) if ep.name == name]
    if not eps:
        known = entry_point_names(group)
        raise ValueError(f"{what}={name!r} is neither built in, a 'module:Class' name, nor an "
                         f"entry point of {group!r} (installed: {', '.join(known) or 'none'})")
    try:
        return eps[0].load()
    except Exception as e:  # noqa: BLE001 - a broken plugin is the caller's bad value
        raise ValueError(f"{what}={name!r}: entry point {eps[0].value!r} failed to load "
                         f"({type(e).__name__}: {e})") from e
