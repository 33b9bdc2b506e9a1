"""On-device runtime: inference engines, camera, publisher, scheduler, hot swap.

Kept import-free on purpose: `import runtime.engines` (or any sibling) pulls in only what it needs,
so the CLI and the serving loop stay fast to start.
"""
