"""Tally's contracts: the usage event, Kafka topics and envelopes, Redis keys, the catalog.

Every service meets every other service only through what is defined here.
"""
