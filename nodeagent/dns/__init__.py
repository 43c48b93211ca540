"""The agent's DNS proxy for its pods (Istio's DNS capture, port 15053)."""
