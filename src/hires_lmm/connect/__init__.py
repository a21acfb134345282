"""Connectors: features → LLM-space visual tokens (projectors, resamplers, DEM, gated mixture,
selector, spatial schema)."""
