"""`python -m genlab ...` trains: the Hydra app in genlab.train."""

from genlab.train import cli

if __name__ == "__main__":
    cli()
