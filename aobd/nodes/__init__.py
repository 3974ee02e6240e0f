"""Executors, one module per node type. ``registry`` maps a node type to its executor."""
