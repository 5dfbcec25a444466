"""What the worker process allows: whether a thread started in it runs.

gunicorn's workers and uWSGI with ``--enable-threads`` or ``--threads`` run Python
threads; uWSGI without either never schedules them. What would run in a thread of
its own (a key refresh, a batch of metrics) runs inline there instead.
"""

from __future__ import annotations

__all__ = ["threads_run"]


def threads_run() -> bool:
    """Whether a thread started here will run: not under uWSGI without ``--enable-threads`` or ``--threads``."""
    try:
        import uwsgi  # type: ignore[import-untyped,unused-ignore]
    except ImportError:
        return True
    options = getattr(uwsgi, "opt", None) or {}
    return bool(options.get("enable-threads") or options.get("threads"))
