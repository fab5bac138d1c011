"""One service or module against the real stores: PostgreSQL, Redis, Tansu, chDB, the Stripe SDK."""
