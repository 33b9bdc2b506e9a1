"""Placeholder: commands arrive with their issue."""
import typer


def register(app: typer.Typer) -> None:
    pass
