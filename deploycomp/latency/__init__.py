"""Latency model: measured lookup tables of ViT parts, interpolated and summed per architecture."""
