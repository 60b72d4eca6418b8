"""The `unmask` command line: the parser (`main.py`) and one module per command group."""
