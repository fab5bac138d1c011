"""The seller's revenue: committed MRR and its movements, usage revenue from invoices,
customers, trials, this month's usage, top customers and the past-due balance.

``mrr`` values a subscription at any instant; ``movements`` and ``trials`` walk every
customer's history into calendar months (pure); ``usage_revenue``, ``live_usage`` and
``ledgers`` read invoices, counters and customers; ``report`` puts the view together for
``routes`` (JSON) and ``pages`` (the dashboard).  The definitions are in
``docs/dashboards.md``.
"""
