"""Offline analysis of sacred runs, rebuilt from their exit records alone.

Modules: ``exit_record`` (the artifact), ``runs`` (find runs in a FileStorageObserver folder or MongoDB),
``anytime`` and ``budgeted`` (per-record curves), ``curves`` (per-run curves aggregated over seeds),
``plots`` (figures); ``python -m analysis --help`` for the command line.
"""
