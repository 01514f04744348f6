"""The frozen reference: the policy's own weights with the adapter off, its log-probs cached on
disk by content (never by position)."""
