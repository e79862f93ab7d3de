"""What the exporter reads about this host's processes from /proc: which one serves a target,
its argv, environment, process group and memory."""
