"""GPU readings: NVML (nvml.py, the only module that imports pynvml), the target's process on
this host (process.py), and the Prometheus collector that renders them (collector.py)."""
