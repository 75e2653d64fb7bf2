"""Torch building blocks: networks (forward maths only) and the one WGAN-GP training loop."""
