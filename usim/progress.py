"""Progress bars for long work (construction, planning, compiling, drawing), silent by default in
every case where a bar would only be noise.

A bar (tqdm, on stderr) appears only when all of these hold:

* progress is enabled: ``usim.set_progress(False)`` switches it off for the process, and so does
  the environment variable ``USIM_PROGRESS=0`` (read once, at import);
* the stream is a terminal (``stream.isatty()``): logs, pipes, CI and pytest stay clean;
* ``tqdm`` can be imported (it is optional: ``pip install tqdm`` or ``pip install -e '.[progress]'``);
* the work has already taken longer than ``delay`` seconds (2 s by default), so quick work never
  flickers a bar.

Intended use, wherever a loop over layers, heads or steps may take seconds::

    from usim.progress import progress, track

    with progress(total=len(layers), desc="planning heads") as bar:
        for layer in layers:
            plan(layer)
            bar.update()

    for layer in track(layers, desc="compiling"):   # the same, as an iterator wrapper
        compile(layer)

A single long step with no update in between still shows its bar once ``delay`` has passed (a
timer thread opens it), so a caller may also use ``total=None`` around one opaque call.
"""

from __future__ import annotations

import os
import sys
import threading
import time

DELAY = 2.0
"""Seconds of work before a bar may appear."""

_enabled = os.environ.get("USIM_PROGRESS", "1").strip().lower() not in ("0", "false", "off", "no")


def set_progress(enabled: bool) -> None:
    """Switch progress bars on (the default) or off for the whole process."""
    global _enabled
    if not isinstance(enabled, bool):
        raise TypeError(f"set_progress expects True or False, got {type(enabled).__name__}")
    _enabled = enabled


def progress_enabled() -> bool:
    """Whether progress bars are switched on (they still need a terminal and tqdm)."""
    return _enabled


def _tqdm_class():
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


class Progress:
    """Counts units of work; opens a tqdm bar once the work is slow enough to deserve one.

    Use it through ``progress(...)`` (a context manager) or ``track(...)``; ``update(n)`` counts
    n more units done, ``close()`` ends the bar. ``shown`` tells whether a bar was opened."""

    def __init__(self, total: int | None = None, desc: str = "", *, delay: float = DELAY, stream=None):
        if total is not None:
            if isinstance(total, bool) or not isinstance(total, int):
                raise TypeError(f"total must be an int or None, got {type(total).__name__}")
            if total < 0:
                raise ValueError(f"total must be >= 0, got {total}")
        if delay < 0:
            raise ValueError(f"delay must be >= 0 seconds, got {delay}")
        self.total = total
        self.desc = desc
        self.delay = float(delay)
        self.stream = sys.stderr if stream is None else stream
        self.count = 0
        self._start = time.monotonic()
        self._bar = None
        self._closed = False
        self._lock = threading.Lock()
        # Decided once: a bar is possible only if enabled, on a terminal, with tqdm importable.
        self._tqdm = _tqdm_class() if (_enabled and _is_terminal(self.stream)) else None
        self._timer = None
        if self._tqdm is not None:
            self._timer = threading.Timer(self.delay, self._show)
            self._timer.daemon = True
            self._timer.start()

    @property
    def shown(self) -> bool:
        """Whether a bar has been opened."""
        return self._bar is not None

    def _show(self) -> None:
        with self._lock:
            if self._bar is None and not self._closed and self._tqdm is not None:
                self._bar = self._tqdm(total=self.total, desc=self.desc, initial=self.count,
                                       file=self.stream, leave=False, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        """Count n more units of work done."""
        self.count += n
        if self._tqdm is None:
            return
        if self._bar is None and time.monotonic() - self._start >= self.delay:
            self._show()
        elif self._bar is not None:
            with self._lock:
                self._bar.update(n)

    def close(self) -> None:
        """End the bar (if one was opened) and stop its timer."""
        with self._lock:
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()
            if self._bar is not None:
                self._bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(total: int | None = None, desc: str = "", *, delay: float = DELAY, stream=None) -> Progress:
    """A ``Progress`` for ``total`` units of work (None: unknown), as a context manager:
    ``with progress(n, "building") as bar: ... bar.update()``. Silent unless enabled, on a
    terminal (stderr by default), with tqdm installed and after ``delay`` seconds."""
    return Progress(total, desc, delay=delay, stream=stream)


def track(iterable, total: int | None = None, desc: str = "", *, delay: float = DELAY, stream=None):
    """Yield the items of ``iterable``, counting each one on a ``Progress`` bar (same rules)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    with Progress(total, desc, delay=delay, stream=stream) as bar:
        for item in iterable:
            yield item
            bar.update()
