"""Notification emails as rendered: every type, its numbers, escaping, the headers."""

from __future__ import annotations

import tomllib
from datetime import UTC, datetime
from decimal import Decimal
from email.parser import BytesParser
from email.policy import default
from fnmatch import fnmatch
from html.parser import HTMLParser
from pathlib import Path

import pytest

from schemas.notifications import NotificationType
from services.billing.notification.email import message, render
from services.billing.notification.email.formats import money, percent, period, quantity
from services.billing.notification.email.links import Links
from services.billing.notification.email.render import ENV, RenderError
from tests.email_support import EXPECTED, PAYLOADS, sample

LINKS = Links("https://api.example.com", "acme")
HOSTILE = '<script>alert("x")</script> & "Sons"'
TEMPLATES = Path("services/billing/notification/email/templates")


def test_every_type_has_an_example_and_both_templates() -> None:
    assert set(PAYLOADS) == set(EXPECTED) == set(NotificationType)
    for kind in NotificationType:
        ENV.get_template(f"{kind.value}.txt")
        ENV.get_template(f"{kind.value}.html")


@pytest.mark.parametrize("kind", list(NotificationType))
def test_every_type_renders_what_happened_the_numbers_and_what_to_do(
    kind: NotificationType,
) -> None:
    rendered = render(sample(kind), LINKS, "Acme")
    subject, numbers, link = EXPECTED[kind]
    assert rendered.subject == subject
    assert rendered.text.startswith("Hello Acme,\n")
    assert f"<title>{subject}</title>" in rendered.html
    for number in numbers:
        assert number in rendered.text and number in rendered.html, number
    assert "https://api.example.com" + link in rendered.text
    assert 'href="https://api.example.com' + link in rendered.html.replace("&amp;", "&")


@pytest.mark.parametrize("kind", list(NotificationType))
def test_html_escapes_a_hostile_company_name(kind: NotificationType) -> None:
    rendered = render(sample(kind), LINKS, HOSTILE)
    assert "<script>" not in rendered.html
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; &amp; &#34;Sons&#34;" in rendered.html
    assert f"Hello {HOSTILE}," in rendered.text  # plain text is shown as is


def test_html_escapes_what_a_payload_carries() -> None:
    test = sample(NotificationType.WEBHOOK_TEST, message='<img src=x onerror="steal()">')
    rendered = render(test, LINKS)
    assert "<img" not in rendered.html and "&lt;img src=x" in rendered.html


def test_without_a_company_the_customer_is_greeted_by_id() -> None:
    assert render(sample(NotificationType.PLAN_CHANGED), LINKS).text.startswith("Hello acme,")


def test_the_alert_kinds_each_read_their_threshold() -> None:
    usage = sample(
        NotificationType.ALERT_TRIGGERED,
        threshold={"kind": "usage", "value": "900", "quantity": "900"},
        unit="GB",
        limit=None,
        rule="rul_1",
    )
    rendered = render(usage, LINKS)
    assert rendered.subject == "api_calls reached 900 GB in December 2026"
    assert "passing your alert at 900 GB" in rendered.text and "alert rule rul_1" in rendered.text
    assert "Limit:" not in rendered.text and "Limit" not in rendered.html
    spend = sample(
        NotificationType.ALERT_TRIGGERED,
        threshold={"kind": "spend", "value": "50", "quantity": "4200"},
        currency="eur",
    )
    rendered = render(spend, LINKS)
    assert rendered.subject == "Your spend reached 50.00 EUR in December 2026"
    assert "/v1/customers/acme/invoices/upcoming" in rendered.text


def test_a_whole_invoice_spend_alert_reads_the_invoice_so_far() -> None:
    whole = sample(
        NotificationType.ALERT_TRIGGERED,
        meter=None,
        usage=None,
        amount="10.004",
        meters={"api_calls": "15000", "compute_seconds": "4599"},
        threshold={"kind": "spend", "value": "10", "quantity": None},
        limit=None,
        rule="alr_1",
        currency="usd",
    )
    rendered = render(whole, LINKS)
    assert rendered.subject == "Your spend reached $10.00 in December 2026"
    assert "Invoice so far: $10.00" in rendered.text and "alert rule alr_1" in rendered.text
    assert "None" not in rendered.text and "None" not in rendered.html
    assert "/v1/customers/acme/invoices/upcoming" in rendered.html


def test_a_payload_missing_a_number_is_an_error_naming_it() -> None:
    broken = sample(NotificationType.INVOICE_FINALIZED)
    del broken.data["total"]
    with pytest.raises(RenderError, match=r"invoice\.finalized msg_\w+: .*'total'"):
        render(broken, LINKS)
    with pytest.raises(RenderError, match=r"not a decimal number: 12\.5"):
        render(sample(NotificationType.INVOICE_FINALIZED, total=12.5), LINKS)


def test_the_message_headers_name_the_notification() -> None:
    notification = sample(NotificationType.API_KEY_EXPIRING)
    sent = datetime(2027, 1, 1, 12, tzinfo=UTC)
    mail = message(notification, "ops@acme.example", "Tally <n@mail.example.com>", LINKS, now=sent)
    again = message(notification, "ops@acme.example", "Tally <n@mail.example.com>", LINKS)
    assert mail["Message-ID"] == again["Message-ID"] == f"<{notification.id}@mail.example.com>"
    parsed = BytesParser(policy=default).parsebytes(mail.as_bytes())
    assert parsed["X-Tally-Notification-Id"] == notification.id
    assert parsed["Date"] == "Fri, 01 Jan 2027 12:00:00 +0000"
    assert parsed["Auto-Submitted"] == "auto-generated"
    assert [p.get_content_type() for p in parsed.iter_parts()] == ["text/plain", "text/html"]
    assert all(byte < 128 for byte in mail.as_bytes())  # 7-bit: no 8BITMIME needed


def test_a_header_cannot_be_injected_through_the_recipient() -> None:
    notification = sample(NotificationType.PLAN_CHANGED)
    with pytest.raises(ValueError):
        message(notification, "a@example.com\r\nBcc: x@example.com", "n@example.com", LINKS)


@pytest.mark.parametrize(
    ("amount", "currency", "shown"),
    [
        ("12.5", "usd", "$12.50"),
        ("1370", "usd", "$1,370.00"),
        ("-5", "usd", "-$5.00"),
        ("0.005", "usd", "$0.01"),  # half up, once
        ("12.5", "eur", "12.50 EUR"),
        ("1200", "jpy", "1,200 JPY"),
        ("1.2345", "kwd", "1.235 KWD"),
        (Decimal("99.999"), "gbp", "100.00 GBP"),
    ],
)
def test_money_is_exact_and_in_the_currency_minor_unit(
    amount: str | Decimal, currency: str, shown: str
) -> None:
    assert money(amount, currency) == shown


def test_numbers_are_decimals_never_floats() -> None:
    assert quantity("1000") == "1,000" and quantity("1E+3") == "1,000"
    assert quantity("12.50") == "12.5" and quantity("0.0005", "GB") == "0.0005 GB"
    assert percent("999", "1000") == "99 %"  # never rounded up to a full quota
    assert percent("1500", "1000") == "150 %" and percent("5", "0") == "100 %"
    for bad in (1.5, "abc", "NaN", None, True):
        with pytest.raises(ValueError, match="not a"):
            quantity(bad)


def test_a_period_reads_as_its_month_or_its_days() -> None:
    month = {"start": "2027-02-01T00:00:00Z", "end": "2027-03-01T00:00:00Z"}
    assert period(month) == "February 2027"
    odd = {"start": "2027-02-10T00:00:00Z", "end": "2027-03-10T00:00:00Z"}
    assert period(odd) == "10 February 2027 to 9 March 2027"


def test_a_subject_is_one_line_whatever_the_payload_says() -> None:
    trial = sample(NotificationType.TRIAL_ENDING, plan="pro\r\nBcc: victim@example.com")
    assert (
        render(trial, LINKS).subject == "Your pro Bcc: victim@example.com trial ends 2 January 2027"
    )
    mail = BytesParser(policy=default).parsebytes(
        message(trial, "ops@acme.example", "n@example.com", LINKS).as_bytes()
    )
    assert mail["Bcc"] is None and mail["To"] == "ops@acme.example"


def test_the_templates_ship_with_the_package() -> None:
    setuptools = tomllib.loads(Path("pyproject.toml").read_text())["tool"]["setuptools"]
    globs = setuptools["package-data"]["services"]
    shipped = [
        path
        for path in TEMPLATES.rglob("*")
        if path.is_file()
        and any(fnmatch(str(path.relative_to("services")), pattern) for pattern in globs)
    ]
    assert sorted(shipped) == sorted(p for p in TEMPLATES.rglob("*") if p.is_file())
    assert len(shipped) >= 2 * len(NotificationType)


class Balance(HTMLParser):
    """Checks that every element an HTML body opens is closed, in order."""

    VOID = frozenset({"meta", "br", "img", "hr", "link", "input"})

    def __init__(self) -> None:
        super().__init__()
        self.open: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in self.VOID:
            self.open.append(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.open and self.open[-1] == tag, (tag, self.open)
        self.open.pop()


@pytest.mark.parametrize("kind", list(NotificationType))
def test_every_html_body_is_well_formed(kind: NotificationType) -> None:
    parser = Balance()
    parser.feed(render(sample(kind), LINKS, HOSTILE).html)
    parser.close()
    assert parser.open == []


def test_the_optional_parts_of_a_payload_may_be_null() -> None:
    failed = render(sample(NotificationType.PAYMENT_FAILED, invoice_id=None), LINKS)
    assert "We could not collect $49.00. Your account is now past due." in failed.text
    changed = render(sample(NotificationType.PLAN_CHANGED, from_plan=None, source="x"), LINKS)
    assert changed.subject == "Your plan changed to pro"
    assert "Your plan changed to pro (x) on" in changed.text
    quota_only = {"meter": "gb", "usage": "9", "forecast": "12", "included": None, "quota": "10"}
    forecast = render(sample(NotificationType.USAGE_FORECAST_OVERAGE, meters=[quota_only]), LINKS)
    assert "gb: 9 so far, forecast 12, quota 10" in forecast.text
    assert '<td style="padding:4px 12px;">—</td>' in forecast.html
