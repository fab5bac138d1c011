"""Tally's services: ingest, aggregator, billing, api, and the thin `common` they share."""
