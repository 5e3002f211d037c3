"""Shoal session service: the single writer of each session's state and event ledger.

Example::

    from shoal.session import create_app, SessionSettings
    app = create_app(SessionSettings())
"""

from shoal.session.app import create_app
from shoal.session.config import SessionSettings
from shoal.session.service import Result, apply

__all__ = ["Result", "SessionSettings", "apply", "create_app"]
