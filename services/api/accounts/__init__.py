"""Accounts: the one owner of customers, API keys and the audit log.

``service`` is the one way they change (every change audited), ``store`` keeps them in
PostgreSQL, ``projection`` copies what enforcement needs into Redis, ``routes`` and
``admin_routes`` serve sign-up, self-service and admin over HTTP.
"""
