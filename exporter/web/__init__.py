"""The HTTP side of the exporter: the endpoint (/metrics, /healthz, /), its server, and the
exporter-toolkit web config (TLS, basic auth)."""
