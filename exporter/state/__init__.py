"""The latest results per target, written by the prober and read, one snapshot per scrape."""
