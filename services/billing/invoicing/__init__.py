"""Invoicing: billing periods, subscription history, drafts, the billing run, invoices over HTTP.

``compose`` builds one customer's invoice for one period (pure); ``drafts`` and ``run`` do it
for many; ``reader`` and ``routes`` read invoices and the upcoming one; ``simulate`` is
``tally rate``, a plan tried on usage typed in.
"""
