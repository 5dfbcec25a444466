from setuptools import setup

TEST = [
    "pytest>=8",
    "hypothesis>=6.100",
    "flask>=3.0",
    "uwsgi>=2.0.24",
    "requests>=2.31",
]

setup(
    name="certbound-wsgi",
    version="0.1.0",
    description="WSGI middleware that accepts OAuth access tokens only from the client they were bound to (RFC 8705, RFC 9449)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=["certbound_wsgi", "certbound_wsgi.cache", "certbound_wsgi.dev", "certbound_wsgi.nginx",
              "certbound_wsgi.proxy_templates"],
    # The shipped nginx, HAProxy and Caddy configurations live at the top of the
    # repository, where operators look for them, and install as package data so
    # that `certbound-wsgi nginx-config` and `proxy-config` render exactly what
    # the tests exercise. (certbound_wsgi.proxies is already a module: the
    # trusted proxies.)
    package_dir={"certbound_wsgi.nginx": "nginx", "certbound_wsgi.proxy_templates": "proxies"},
    package_data={"certbound_wsgi": ["py.typed"], "certbound_wsgi.nginx": ["*.conf"],
                  "certbound_wsgi.proxy_templates": ["haproxy.cfg", "Caddyfile"]},
    # The core needs no server: gunicorn and uWSGI are extras. redis stays in the
    # core because cache/redis.py imports it at module level and the middleware
    # imports that module whether or not Redis is configured.
    install_requires=[
        "werkzeug>=3.0",
        "authlib>=1.6",
        "joserfc>=1.0",
        "cryptography>=42",
        "requests>=2.31",
        "redis>=5",
    ],
    extras_require={
        "gunicorn": ["gunicorn>=22"],
        "uwsgi": ["uwsgi>=2.0.24"],
        # Kept so that `pip install certbound-wsgi[redis]` keeps working; redis is in the core.
        "redis": ["redis>=5"],
        "flask": ["flask>=3.0"],
        "prometheus": ["prometheus_client>=0.17"],
        # Everything the suite runs, the real app servers and the optional integrations included.
        "test": TEST + ["gunicorn>=22", "prometheus_client>=0.17", "redis>=5"],
        "lint": ["ruff>=0.6", "mypy>=1.10", "types-requests", "flask>=3.0", "redis>=5", "pytest>=8",
                 "prometheus_client>=0.17", "hypothesis>=6.100"],
        "docs": ["sphinx>=7", "myst-parser>=2", "flask>=3.0"],
        # bench/e2e.py runs gunicorn, which is no longer in the core.
        "bench": ["matplotlib", "gunicorn>=22"],
    },
    entry_points={"console_scripts": ["certbound-wsgi = certbound_wsgi.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Framework :: Flask",
        "Topic :: Internet :: WWW/HTTP :: WSGI :: Middleware",
        "Topic :: Security",
        "Typing :: Typed",
    ],
)
