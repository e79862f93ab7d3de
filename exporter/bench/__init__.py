"""`llama-speed-exporter bench`: the owner's whole benchmark report from one command."""
