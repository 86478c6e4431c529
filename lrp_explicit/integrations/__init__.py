"""Integrations with other libraries, each an optional extra.

A module here imports its library at import time and is imported only when a user asks for it
(``import lrp_explicit.integrations.inseq``); ``import lrp_explicit`` imports none of them, so
the core package does not depend on these libraries.
"""
