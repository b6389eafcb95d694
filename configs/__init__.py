"""YAML presets of the runtime (low_latency, high_throughput, balanced), installed as `dsjax_configs`."""
