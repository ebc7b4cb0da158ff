"""Roles that drive the sans-I/O bidding machines of `protocol.bidding` inside an agent."""
