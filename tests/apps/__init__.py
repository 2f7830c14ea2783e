"""Tiny applications that tests (and the README's multi-worker commands) run in real servers."""
