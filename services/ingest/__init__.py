"""Ingest: CloudEvents over HTTP in, per-customer envelopes into Kafka out."""
