"""Every table of the billing service, so migrations see them all."""

from services.billing.charge.models import Charge
from services.billing.driver.models import Driver, OtpChallenge, PaymentAccount, SmsMessage, Vehicle
from services.billing.ledger.models import Journal, LedgerEntry

__all__ = [
    "Charge",
    "Driver",
    "Journal",
    "LedgerEntry",
    "OtpChallenge",
    "PaymentAccount",
    "SmsMessage",
    "Vehicle",
]
