"""The ``/metrics`` recipe of docs/operations.md, as a module gunicorn and uWSGI can load.

``tests/e2e/test_operations.py`` checks that this is the documented block, word for word.
"""

# myproject/serve.py
from werkzeug.middleware.dispatcher import DispatcherMiddleware

from certbound_wsgi.metrics import metrics_app
from certbound_wsgi.wsgi import create_application

application = DispatcherMiddleware(create_application(), {"/metrics": metrics_app})
