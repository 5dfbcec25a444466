"""Benchmarks of certbound-wsgi, side by side with a bare app and with authlib.

``python -m bench`` runs every part and writes ``bench/results/latest.md``,
``latest.json`` and (with matplotlib) ``latest.png``. Never collected by
pytest: its ``testpaths`` is ``tests``.
"""
