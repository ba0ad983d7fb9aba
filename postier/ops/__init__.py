"""Operations: systemd, metrics, status, setup, doctor."""
