"""The ``jpaged`` command line (`jpaged.cli.main`); thin: flags in, library calls out."""
