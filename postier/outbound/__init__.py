"""The relay side of outbound mail: which TLS a next hop owes us, and what we report on it.

- `tls_policy`: the levels (none/may/encrypt/verify/dane) and the decision which policy
  applies to a destination and each of its MX hosts;
- `mta_sts`: MTA-STS discovery, fetch and on-disk cache (RFC 8461);
- `dane`: TLSA matching for SMTP (RFC 7672, RFC 6698);
- `tlsrpt`: TLS-RPT tallies and the daily JSON report (RFC 8460).
"""
