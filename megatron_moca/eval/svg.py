"""SVG -> PNG for the evaluation sets whose images ship as SVG (Tux Paint stamps, flag-icons)."""

from __future__ import annotations

from typing import Callable, Optional


def svg_rasteriser(width: int) -> Optional[Callable[[str], Optional[bytes]]]:
    """svg path -> PNG bytes `width` pixels wide (None where the SVG cannot be drawn), or None without
    cairosvg (the dev extra) or the cairo library it loads."""
    try:
        import cairosvg
    except (ImportError, OSError):
        return None

    def rasterise(path: str) -> Optional[bytes]:
        # Adobe-made SVGs declare XML entities, which cairosvg refuses unless unsafe=True; the callers'
        # files come from checksummed packages, so they are read a second time with entities allowed
        for unsafe in (False, True):
            try:
                return cairosvg.svg2png(url=path, output_width=width, unsafe=unsafe)
            except Exception:  # cairosvg raises parser, entity and cairo errors alike
                continue
        return None

    return rasterise
