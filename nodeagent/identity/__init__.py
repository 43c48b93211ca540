"""Workload identity: CA backends, per-identity certificates and their rotation, SDS secrets."""
