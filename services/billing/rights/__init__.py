"""Drivers' rights over their personal data: export, deletion, log out everywhere, new phone."""
