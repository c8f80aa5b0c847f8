"""Measurement: `make bench` (speed, memory, accuracy per model file), the accuracy script and the metrics.

Like the faces, it uses only the runtime's public API (`allinone_gguf.runtime`).
"""
