"""contact-worker: keeps contacts in the Smstools SMS Gateway API in sync with upstream systems."""

__version__ = "0.1.0"
