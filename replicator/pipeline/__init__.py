"""What joins source and destination: sessions, the receiver, the hand-off, the initial copy."""
