"""Operating postier: the self-check (`doctor`), the DNS records to publish, and friends."""
