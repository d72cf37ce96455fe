"""Kept for existing imports: the service launcher lives in :mod:`app.service_process`."""

from app.service_process import SENDER_AET, SERVE_AET, Service, serve_config

__all__ = ["SENDER_AET", "SERVE_AET", "Service", "serve_config"]
