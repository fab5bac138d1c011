"""The customer dashboard: one customer's limits, usage and invoices as a page, reached
by a portal link the seller mints (a short-lived signed token) or the customer's own key."""
