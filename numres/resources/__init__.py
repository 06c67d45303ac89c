"""Data files shipped with numres (the ImageNet class names)."""
