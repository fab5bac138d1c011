"""Billing: the rollup, rating, invoicing and Stripe, each a folder of its own."""
