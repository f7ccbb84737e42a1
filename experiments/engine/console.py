"""What the person watching a run sees, kept apart from what sacred records.

sacred captures stdout/stderr while a run is going (``--capture=fd`` swaps the file descriptors for pipes),
so during a run nothing looks like a terminal any more and every ``\\r`` frame of a progress bar would land in
the recorded output. This module therefore looks at stderr once, when it is imported: every experiment
imports it (through ``engine.trainer``) before sacred starts a run, so nothing has to be called. If the
original stderr was a terminal, ``TERMINAL_STREAM`` is a private duplicate of it that progress bars write to,
past sacred's capture.
"""
from __future__ import annotations

import os
from typing import TextIO

from sacred.utils import apply_backspaces_and_linefeeds

# Set on an experiment (``ex.captured_out_filter = captured_out_filter``) so that any ``\r`` / backspace
# output that still reaches sacred (another library's bar) is recorded as the final text, not every frame.
captured_out_filter = apply_backspaces_and_linefeeds


def _terminal_stream() -> TextIO | None:
    """A duplicate of file descriptor 2 when it is a terminal, so it stays one after sacred redirects fd 2."""
    if not os.isatty(2):
        return None
    return os.fdopen(os.dup(2), "w")


TERMINAL_STREAM: TextIO | None = _terminal_stream()
TERMINAL = TERMINAL_STREAM is not None


def format_duration(seconds: float) -> str:
    """'12.3s', '5m33s' or '2h05m': short enough for the one summary line per epoch."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes = int(round(seconds)) // 60
    if minutes < 60:
        return f"{minutes}m{int(round(seconds)) % 60:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"
