"""Collecting feedback: the chat (terminal and local web page) that writes ratings,
the durable feedback file they go to, and importers for ratings made elsewhere."""
