"""Loads the optional compiled extension ``vitfast._C``.

``HAS_EXT`` says whether it is importable; ``reason`` says why not. Nothing else in the package imports the
extension directly, so a missing or broken build never stops ``import vitfast``.
"""

try:
    from vitfast import _C  # noqa: F401

    HAS_EXT = True
    reason = ""
except ImportError as exc:  # the extension is optional: the reference path runs without it
    HAS_EXT = False
    reason = f"the compiled extension vitfast._C is not available ({exc})"
