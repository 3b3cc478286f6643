"""Detection heads and box decoding."""
