"""Placeholder: train, prototypes, adapt, eval, demo arrive with the core issue."""
import typer


def register(app: typer.Typer) -> None:
    pass
