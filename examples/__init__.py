"""Runnable examples: one app per framework, all behind the DPoP middleware (see each module)."""
