"""The websocket bus and the plain HTTP routes on the same port (CONTRACT §4, §5)."""
