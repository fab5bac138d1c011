"""Notifications: alert rules, webhook endpoints, the notification outbox and its delivery
by signed webhook (Standard Webhooks) and email.

The one owner of the tables ``alert_rules``, ``webhook_endpoints``, ``notifications``,
``notification_deliveries`` and ``delivery_attempts``.  Other services hand notifications
over through ``schemas.notifications`` (a Redis stream), never by writing these tables.
"""
