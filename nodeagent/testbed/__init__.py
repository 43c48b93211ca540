"""Simulated Kubernetes nodes and pods in network namespaces, with the real CNI plugins."""
