-- Analytics SQL's `invoice_lines`: one row per line of the newest copy of each invoice
-- (drafts, finalized and the rest: filter on `status`). Amounts are Decimal, rounded
-- once per line to the currency's minor unit, as on the invoice.
CREATE OR REPLACE VIEW {database}.analytics_invoice_lines AS
SELECT customer, id AS invoice_id, line, period, period_start, period_end, status, currency,
    kind, plan, meter, description, line_start, line_end, quantity, billable, amount
FROM {database}.invoices FINAL
ARRAY JOIN
    arrayEnumerate(line_kind) AS line,
    line_kind AS kind,
    line_plan AS plan,
    line_meter AS meter,
    line_description AS description,
    line_start,
    line_end,
    line_quantity AS quantity,
    line_billable AS billable,
    line_amount AS amount
