"""Frontends: model formats -> IR Graph."""
