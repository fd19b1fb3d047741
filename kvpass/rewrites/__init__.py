"""Graph passes: find attention sites in a captured graph and rewrite them (one pattern set per framework)."""
