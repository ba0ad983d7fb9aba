"""postier: a small, secure, fast SMTP mail transfer agent."""

__version__ = "0.1.0"
