"""One progress bar style for long CPU/GPU jobs (embedding for eval, conversion): tqdm on stderr, redrawn
at most every 2 s, with rate and ETA; stdout stays for results (the last line of `moca eval` is JSON)."""

from __future__ import annotations

import sys
from typing import Iterable, Optional


def progress_bar(desc: str, total: Optional[int] = None, unit: str = "item", disable: bool = False):
    """A tqdm bar (a context manager); disable=True: one that draws nothing."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, mininterval=2.0, leave=False, disable=disable)


def with_progress(items: Iterable, desc: str, total: Optional[int] = None, unit: str = "item"):
    """Yield `items`, advancing a bar per item."""
    bar = progress_bar(desc, total, unit)
    try:
        for item in items:
            yield item
            bar.update(1)
    finally:
        bar.close()
