"""The shipped HAProxy and Caddy configurations (templates; see certbound_wsgi.proxy_config)."""
