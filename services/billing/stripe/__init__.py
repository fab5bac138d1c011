"""Stripe: the client and its recorded ids, the catalog mirrored as prices, Checkout and
portal sessions, the meter-event outbox, and webhooks.
"""
