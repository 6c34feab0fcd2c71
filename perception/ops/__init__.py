"""Operators the models are built from, each fast path beside its slow reference."""

from perception.ops.graphs import knn_graph, radius_graph
from perception.ops.scan import selective_scan, selective_scan_ref

__all__ = ["knn_graph", "radius_graph", "selective_scan", "selective_scan_ref"]
