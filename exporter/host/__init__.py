"""What the exporter reads about this host's processes from /proc: which one serves a target,
its argv, environment, working directory, process group and memory; and how it reads the files
those processes name, without blocking on them (`files`, `blocking`)."""
