"""The node's xDS server: a snapshot cache (what to send) and an ADS server (how to stream it)."""
