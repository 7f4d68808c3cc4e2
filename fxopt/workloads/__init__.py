"""Workloads: the built-in model zoo, MODEL spec strings, and data a model can learn offline."""
