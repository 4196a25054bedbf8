"""LoRA: the network hooks, the file formats, reading LoRA files, the training adapter."""
