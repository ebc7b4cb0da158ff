"""twinbid."""
