import typer

app = typer.Typer(help="Generate and transform datasets.")
