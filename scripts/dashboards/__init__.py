"""The llama-speed Grafana dashboards as code, one module each; scripts/gen_dashboards.py writes
them to grafana/dashboards/."""
