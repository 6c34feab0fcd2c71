"""Datasets: procedural shapes, real meshes, surface sampling, rendering, and the prepared-array format."""
