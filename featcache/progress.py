"""Progress and verbosity shared by the commands: one bar or one line every 30 s, and --quiet.

``Progress`` shows rows/s and an ETA: a tqdm bar when stderr is a terminal, otherwise (a log
file, a batch job) one plain line every ``interval`` seconds and one at the end, so logs stay
short. The verbosity level is process-wide: ``-1`` quiet (no progress, no library loading bars),
``0`` normal, ``1`` verbose (one line per step); the CLI groups set it from ``--quiet/--verbose``.

Probe steps (bootstrap draws, kNN query blocks, cross-validation folds ...) open their bars with
:func:`probe_progress`. Those are off in library calls, so a notebook or a test calling
``probes.run.run_knn`` prints nothing; a command turns them on with ``set_probe_progress(True)``.
They write to stderr only, appear only once a step has run ``delay`` seconds (2 s), and a short
step leaves no line behind.

This module imports neither torch nor transformers.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import TextIO

__all__ = [
    "Progress",
    "get_verbosity",
    "probe_progress",
    "probe_progress_on",
    "quiet_libraries",
    "set_probe_progress",
    "set_verbosity",
]

QUIET, NORMAL, VERBOSE = -1, 0, 1
_level = NORMAL
_probe_steps = False
PROBE_DELAY = 2.0
"""Seconds a probe step runs before its bar (or first line) is shown."""


def get_verbosity() -> int:
    """The process-wide level: -1 quiet, 0 normal, 1 verbose."""
    return _level


def set_verbosity(level: int) -> None:
    """Set the process-wide level (-1 quiet, 0 normal, 1 verbose); quiet also silences the libraries."""
    global _level
    if level not in (QUIET, NORMAL, VERBOSE):
        raise ValueError(f"verbosity must be -1, 0 or 1, got {level!r}")
    _level = level
    if level == QUIET:
        quiet_libraries()


def set_probe_progress(on: bool) -> None:
    """Turn the probe steps' progress on (the commands) or off (the default: library calls)."""
    global _probe_steps
    _probe_steps = bool(on)


def probe_progress_on() -> bool:
    """Whether probe steps show progress: switched on and the verbosity not quiet."""
    return _probe_steps and _level > QUIET


def probe_progress(total: int | None, desc: str, unit: str = "steps") -> Progress:
    """A :class:`Progress` for one probe step: shown only when :func:`probe_progress_on`, after
    :data:`PROBE_DELAY` seconds, on stderr; a bar that ends sooner leaves nothing behind.

    Example:
        >>> with probe_progress(n_blocks, "kNN search", unit="blocks") as bar:
        ...     for block in blocks:
        ...         search(block)
        ...         bar.update(1)
    """
    return Progress(total, desc, unit, enabled=probe_progress_on(), delay=PROBE_DELAY, leave=False)


def quiet_libraries() -> None:
    """Silence transformers' and huggingface_hub's own loading bars and info/warning messages.

    The environment variables reach the libraries when they are imported later (this module
    never imports them itself, so ``probes`` stays free of them); a library already imported is
    switched off through its own calls (``transformers.utils.logging.disable_progress_bar`` and
    ``set_verbosity_error``, ``huggingface_hub.utils.disable_progress_bars``).
    """
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Count work done, with rate and ETA.

    Example:
        >>> with Progress(len(steps), "study", unit="runs") as bar:
        ...     for step in steps:
        ...         run(step)
        ...         bar.update(1)

    Args:
        total: units of work expected (None: unknown, no ETA).
        desc: what is being counted, shown first.
        unit: name of one unit (``rows``, ``runs``, ``images``).
        enabled: False shows nothing (None: shown unless the verbosity is quiet).
        stream: where to write (default ``sys.stderr``).
        interval: seconds between plain lines when the stream is not a terminal.
        clock: monotonic clock in seconds (tests pass a fake one).
        delay: seconds before anything is shown: the tqdm bar appears after it (tqdm's ``delay``),
            the first plain line comes at ``max(delay, interval)`` and the closing line only when
            the work took at least ``delay`` (0: as before, a closing line whenever work was done).
        leave: keep the tqdm bar on screen when it closes (False for inner steps).
    """

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str = "rows",
        *,
        enabled: bool | None = None,
        stream: TextIO | None = None,
        interval: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        delay: float = 0.0,
        leave: bool = True,
    ) -> None:
        self.total = total
        self.desc = desc
        self.unit = unit
        self.n = 0
        self.enabled = get_verbosity() > QUIET if enabled is None else bool(enabled)
        self.stream = stream if stream is not None else sys.stderr
        self.interval = float(interval)
        self._clock = clock
        self.delay = float(delay)
        self._start = clock()
        self._last_line = self._start + max(0.0, self.delay - self.interval)
        self._bar = None
        self._closed = False
        if self.enabled and _is_tty(self.stream):
            try:
                from tqdm import tqdm
            except ImportError:  # pragma: no cover - tqdm is a dependency
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(
                    total=total,
                    desc=desc,
                    unit=f" {unit}",
                    file=self.stream,
                    dynamic_ncols=True,
                    delay=self.delay,
                    leave=leave,
                )

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def rate(self) -> float:
        """Units per second since the start (0 before any time has passed)."""
        elapsed = self._clock() - self._start
        return self.n / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        """The plain status line: ``desc: n/total unit (r unit/s, ETA m:ss)``."""
        rate = self.rate
        text = (
            f"{self.desc}: {self.n}" + (f"/{self.total}" if self.total is not None else "") + f" {self.unit}"
        )
        extra = f"{rate:.2f} {self.unit}/s" if rate else "starting"
        if self.total is not None and rate and self.n < self.total:
            extra += f", ETA {_duration((self.total - self.n) / rate)}"
        elif self.n and self.total is not None and self.n >= self.total:
            extra += f", {_duration(self._clock() - self._start)} in all"
        return f"{text} ({extra})"

    def update(self, n: int = 1) -> None:
        """Count ``n`` more units done."""
        self.n += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        now = self._clock()
        if now - self._last_line >= self.interval:
            self._last_line = now
            print(self.line(), file=self.stream, flush=True)

    def write(self, text: str) -> None:
        """A message that does not break the bar (shown unless disabled)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        """End the bar, or write the last plain line."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and self.n and self._clock() - self._start >= self.delay:
            print(self.line(), file=self.stream, flush=True)


def _is_tty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
