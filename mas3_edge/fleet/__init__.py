"""Sharing adapted normalisation sets between robots: signed, content-addressed objects in a
folder or an S3 store (objects, store, sync), judged by each robot before use (adopt)."""
