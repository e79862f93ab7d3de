"""The alert simulator's parts: a trace, a virtual clock, a fake server that follows the trace,
what Prometheus would have scraped, and the shipped rules evaluated over it by Prometheus."""
