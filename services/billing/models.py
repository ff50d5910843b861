"""Every table of the billing service, so migrations see them all."""

from services.billing.charge.models import Charge
from services.billing.driver.models import Driver, OtpChallenge, PaymentAccount, SmsMessage
from services.billing.invoice.models import Invoice, InvoiceItem, SandboxInvoiceSeries
from services.billing.ledger.models import Journal, LedgerEntry
from services.billing.merchant.models import Merchant, Validation
from services.billing.notification.models import (
    Delivery,
    Notification,
    PostpayWatch,
    Preference,
    Webhook,
)
from services.billing.vehicle.models import Vehicle

__all__ = [
    "Charge",
    "Delivery",
    "Invoice",
    "InvoiceItem",
    "Notification",
    "PostpayWatch",
    "Preference",
    "SandboxInvoiceSeries",
    "Webhook",
    "Driver",
    "Journal",
    "LedgerEntry",
    "Merchant",
    "OtpChallenge",
    "PaymentAccount",
    "SmsMessage",
    "Validation",
    "Vehicle",
]
