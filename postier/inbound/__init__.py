"""The application side of an SMTP session, driven by protocol events (no sockets).

`handler.InboundHandler` turns the events of `postier.protocol` into decisions: it keeps
the `Transaction` (queue id, targets, spool writer) for exactly as long as the protocol says
the transaction lasts, runs the chain of checks (`postier.checks`) at each stage, streams the
content to the spool and hands the finished message to the router. The asyncio session
(`postier.net.session`) only moves bytes between the socket and the protocol.
"""
