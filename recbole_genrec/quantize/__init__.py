"""Item and user identifiers: quantizers and code tables."""
