"""Money work set aside: charges, refunds and notification deliveries parked after repeated
unexpected errors, listed for ops and replayed once the cause is fixed."""
