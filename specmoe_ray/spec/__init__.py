"""Speculation: draft proposals, their verification, and how many tokens to draft per step."""
