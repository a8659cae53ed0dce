"""The command line (click) and its rendering (rich): the only layer that prints."""
