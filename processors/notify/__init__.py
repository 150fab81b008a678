"""Notifications of alerts: who (rota.py), what (message.py), signed how (signing.py), sent
through which channel (channels.py) with retries and fallback (deliver.py). Below the
streams and the connectors, so the notify stage sends and the HTTP intake verifies
acknowledgement links with one implementation (docs/ARCHITECTURE.md, Notification)."""
