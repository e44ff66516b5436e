"""MLS: Multi-Label Self-supervised learning with scene images (Zhu, Fu, Wu, ICCV 2023)."""
__version__ = "0.1.0"
