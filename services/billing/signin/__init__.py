"""Driver sign-in: a one-time code sent by SMS, exchanged for a bearer token."""
