"""Accounts: the one owner of customers, API keys and the audit log.

``service`` changes them (every change audited), ``projection`` copies what enforcement
needs into Redis, ``routes`` and ``admin_routes`` serve sign-up, self-service and admin.
"""
