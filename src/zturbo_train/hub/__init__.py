"""Hugging Face Hub: downloads (public huggingface_hub API), bf16 conversion."""
