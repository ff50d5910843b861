"""Ops' view of what the city set aside: dead letters of every consumer and billing's parked
money work, with replay."""
