"""``python -m quantize_cli`` runs the ``qz`` command line."""

from .cli import main

if __name__ == "__main__":
    main()
