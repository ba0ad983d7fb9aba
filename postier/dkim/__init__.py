"""DKIM for postier: keys on disk, their DNS records, and signing at queue commit."""
