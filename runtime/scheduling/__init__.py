"""Which requests run in each step and which KV blocks they hold. No torch in this package."""
