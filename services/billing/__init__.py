"""Billing: rollups of raw events into PostgreSQL today; rating, invoices and Stripe later."""
