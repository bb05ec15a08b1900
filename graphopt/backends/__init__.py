"""Backends: IR Graph -> runnable programs."""
