"""zturbo-train: LoRA training for Z-Image Turbo with the de-distilling training adapter."""

__version__ = "0.1.0"
