"""Profiling: routing traces, all-to-all counts and times, summaries and dashboards (``c2r-profile``)."""
