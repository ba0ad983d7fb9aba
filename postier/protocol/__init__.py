"""The sans-I/O SMTP protocol core.

Nothing in this package touches a socket, a file, a clock or asyncio, and it imports nothing
from the rest of postier. Bytes go in, events and reply bytes come out. That keeps it fast,
easy to fuzz, and testable by feeding bytes.
"""
