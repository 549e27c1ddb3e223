"""A run and its stages. Importing the package declares the built-in stages, so the registry is full wherever it
is read (the run order, the CLI, the DAG), as importing `timm.models` registers every model."""

from fashion_tagger.runs import stages  # noqa: F401  (declares the stages)
