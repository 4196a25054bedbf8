"""Memory and speed: estimate, presets, levers, attention kernels, quantization, offload."""
