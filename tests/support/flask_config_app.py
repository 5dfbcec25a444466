"""A Flask app configured in ``app.config`` only partly, for ``check-config --app`` and the environment fallback."""

from __future__ import annotations

from flask import Flask

app = Flask(__name__)
app.config.update(CERTBOUND_AUDIENCE=["https://from-config.test"], CERTBOUND_LEEWAY=7)
