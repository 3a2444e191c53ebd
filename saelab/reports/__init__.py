"""Static reports about trained SAEs (HTML feature browser)."""
