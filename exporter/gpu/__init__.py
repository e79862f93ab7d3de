"""NVML behind one module (nvml.py, the only one that imports pynvml)."""
