"""Vision encoders: a ViT over Hugging Face CLIP/SigLIP with position-embedding interpolation,
a ConvNeXt high-resolution pathway, and LLaVA-HR's dual pathway with MR-adapters."""
