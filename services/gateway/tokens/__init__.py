"""Admin tokens: issued by the CLI, listed and revoked by admins, refused once revoked."""
