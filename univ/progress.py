"""Progress on stderr: tqdm's bar on a terminal; elsewhere (a log file, nohup, a job scheduler),
where tqdm stays silent, one log line every LOG_EVERY seconds with what is done, the rate and
the time left, so that an hours-long run in a log file shows where it is. The lines come from a
timer while the bar is open, so a long step between two updates is not silent either."""

from __future__ import annotations

import logging
import sys
import threading
import time

from tqdm import tqdm

LOG_EVERY = 60.0
"""Seconds between progress lines when stderr is not a terminal."""
_last_line = [time.monotonic()]
"""When the process last wrote a progress line: a run made of many bars shorter than LOG_EVERY
(a match's comparisons, one after another) still shows a line every LOG_EVERY."""
log = logging.getLogger("univ")


def bar(total: float, desc: str, unit: str, initial: float = 0, progress: bool = True):
    """A context manager with update(n), like tqdm."""
    if not progress:
        return tqdm(total=total, disable=True)
    if sys.stderr.isatty():
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, unit_scale=True)
    return _Lines(total, desc, unit, initial)


def _fmt(x: float) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.3g}"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class _Lines:
    def __init__(self, total: float, desc: str, unit: str, initial: float):
        self.total, self.desc, self.unit = total, desc, unit
        self.done = self.start_done = initial
        self.start = time.monotonic()
        self._closed = threading.Event()
        self._timer = threading.Thread(target=self._report_every, daemon=True)
        self._timer.start()

    def update(self, n: float = 1) -> None:
        self.done += n

    def _report_every(self) -> None:
        while not self._closed.wait(LOG_EVERY / 12):  # wakes often, writes only once per LOG_EVERY
            now = time.monotonic()
            if now - _last_line[0] < LOG_EVERY:
                continue
            _last_line[0] = now
            rate = (self.done - self.start_done) / max(now - self.start, 1e-9)
            left = (self.total - self.done) / rate if rate > 0 else float("inf")
            eta = _duration(left) if left != float("inf") else "?"
            log.info("%s: %s/%s %s (%.1f%%), %s %s/s, %s left", self.desc, _fmt(self.done), _fmt(self.total),
                     self.unit, 100 * self.done / max(self.total, 1), _fmt(rate), self.unit, eta)

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._timer.join()
        if time.monotonic() - self.start >= LOG_EVERY:  # only runs long enough to have reported
            log.info("%s: done, %s %s in %s", self.desc, _fmt(self.done), self.unit,
                     _duration(time.monotonic() - self.start))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
